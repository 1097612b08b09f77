"""What `experiments.main` runs: config validation, the training jobs of each study, evaluation
and the per-run outputs.

A config names studies (fig1a, fig1b, fig1c, fig2, fig3, layers, classical). Each study needs
some trained models ("jobs"); a job trained for one study is reused by the others (e.g. the
meta-trained LISTA of Figure 1a is also Figure 2's curve). Per job, in WORKDIR/<job>/:
  checkpoints/      Orbax checkpoints (relaunching resumes from the latest good one)
  metrics.jsonl     train loss and test error at every evaluation (one JSON object a line)
  events.out.tfevents.*  the same scalars for TensorBoard
  results.json      final numbers (mean, std and per-seed values over the trained seeds)
and WORKDIR/config.json (the resolved config), WORKDIR/results.json (every job and reference),
WORKDIR/classical.{json,md}.
"""
from __future__ import annotations

import functools
import json
import math
import os
import shutil
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import l2o_jax as L
from l2o_jax import checkpoint as ckpt_lib
from l2o_jax import distributed, lista, train
from experiments import writers

STUDIES = ("fig1a", "fig1b", "fig1c", "fig2", "fig3", "layers", "classical")
LISTA_METHODS = ("lista", "lista_cp", "alista", "lista_meta", "lista_cp_meta", "lista_vm", "lista_vm_ss")
TF_METHODS = ("small_tf", "gpt2")
METHODS = LISTA_METHODS + TF_METHODS
READOUTS = ("linear", "query", "query_dagger")
FIXED_X = ("lista", "lista_cp", "alista")          # trained on one fixed X (classical L2O)
# Config fields that only pick which jobs a study runs (each job trains on its own, and a finished
# one is skipped on relaunch), so a relaunch may change them, e.g. to add a read-out to Figure 1c;
# results.json's "job_lists" keeps every entry run in the workdir (`job_lists`, `widen`).
JOB_LISTS = ("fig1a.methods", "fig1b.methods", "fig1c.readouts", "fig2.methods", "fig3.methods", "layers.ks")
# Config fields that may change between launches on the same workdir (they do not change results;
# cpu_devices does, by float rounding, so a started job also checks its recorded device count:
# `check_job_devices`).
RELAUNCH_MAY_CHANGE = ("log_every_s", "multihost", "studies", "name", "cpu_devices",
                       "coordinator_address", "num_processes", "process_id", *JOB_LISTS)
# Fields added after runs were made, with the value those runs used (a relaunch of an older
# workdir compares its config.json as if it held them).
ADDED_FIELDS = {"matmul_precision": "float32", "coordinator_address": "", "num_processes": 0,
                "process_id": -1, "tf.small_tf_score_clip": 0.0, "lista_train.method_clip_norms": ""}
# config.matmul_precision -> jax_default_matmul_precision.
MATMUL_PRECISIONS = {"float32": "highest", "default": None}


class ConfigError(ValueError):
  """A config that cannot work; the message names the field and the allowed values."""


# ---------------------------------------------------------------------------------------------
# Validation.


def _split(value) -> list[str]:
  return [v.strip() for v in str(value).split(",") if v.strip()]


def job_lists(cfg, earlier: dict | None = None) -> dict[str, list[str]]:
  """The JOB_LISTS entries of `earlier` (results.json's "job_lists") with those of config `cfg`
  (a ConfigDict or its JSON dict) added for the studies it runs, in first-run order."""
  out = {f: list(v) for f, v in (earlier or {}).items()}
  studies = _split(cfg["studies"])
  for field in JOB_LISTS:
    study, key = field.split(".")
    if study in studies:
      out[field] = list(dict.fromkeys([*out.get(field, []), *_split(cfg[study][key])]))
  return out


def widen(cfg, results: dict) -> None:
  """Sets `cfg`'s studies and JOB_LISTS fields (in place; ConfigDict or JSON dict) to everything
  run into its workdir, from the workdir's results.json `results`: config.json holds only the
  latest launch's, and a report or `experiments.trained` must reach the earlier launches' jobs.
  Earlier launches' entries come first (first-run order), then any new ones of `cfg`."""
  cfg["studies"] = ",".join(dict.fromkeys([*results.get("studies", []), *_split(cfg["studies"])]))
  for field, entries in results.get("job_lists", {}).items():
    study, key = field.split(".")
    cfg[study][key] = ",".join(dict.fromkeys([*entries, *_split(cfg[study][key])]))


def _ints(field: str, value) -> list[int]:
  try:
    return [int(v) for v in _split(value)]
  except ValueError:
    raise ConfigError(f"{field}: expected comma-separated integers, got {value!r}") from None


def _positive(field: str, value, minimum: int = 1) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ConfigError(f"{field}: expected an integer >= {minimum}, got {value!r}")


def _choices(field: str, values: list[str], allowed) -> None:
  for v in values:
    if v not in allowed:
      raise ConfigError(f"{field}: unknown name {v!r}; allowed: {', '.join(allowed)}")


def _number(field: str, value, low: float = 0.0, *, strict: bool = False) -> float:
  """A finite number >= low (> low when strict)."""
  ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        and (value > low if strict else value >= low))
  if not ok:
    raise ConfigError(f"{field}: expected a finite number {'>' if strict else '>='} {low:g}, got {value!r}")
  return float(value)


def classical_lams(c) -> list[float]:
  """eval.classical_lams: the lam values of the classical table (comma-separated, each >= 0)."""
  try:
    lams = [float(v) for v in _split(c.eval.classical_lams)]
  except ValueError:
    raise ConfigError(f"eval.classical_lams: expected comma-separated numbers >= 0, "
                      f"got {c.eval.classical_lams!r}") from None
  if not lams:
    raise ConfigError("eval.classical_lams: expected at least one lam, got none")
  for lam in lams:
    _number("eval.classical_lams", lam)
  return lams


def _multiple(field: str, value: int, of_field: str, of: int) -> None:
  if value % of:
    raise ConfigError(f"{field}: expected a multiple of {of_field}={of}, got {value}")


def validate(c) -> None:
  """Raises ConfigError (naming the field and what is allowed) for a config that cannot work."""
  studies = _split(c.studies)
  if not studies:
    raise ConfigError(f"studies: expected at least one of {', '.join(STUDIES)}, got {c.studies!r}")
  _choices("studies", studies, STUDIES)
  p = c.problem
  for f in ("d", "n", "s"):
    _positive(f"problem.{f}", p[f])
  if p.s > p.d:
    raise ConfigError(f"problem.s: expected s <= problem.d={p.d} (at most d nonzeros), got {p.s}")
  _number("problem.noise_std", p.noise_std)
  _positive("seeds", c.seeds)
  # jax.random.key takes a 64-bit seed; seeds seed .. seed + seeds - 1 are trained.
  for f, low, high in (("seed", c.seed, c.seed + c.seeds - 1), ("eval.seed", c.eval.seed, c.eval.seed)):
    if isinstance(low, bool) or not isinstance(low, int) or low < -2 ** 63 or high >= 2 ** 63:
      raise ConfigError(f"{f}: expected an integer whose seeds fit in 64 bits (jax.random.key), "
                        f"got {low!r}" + (f" (seeds up to {high})" if high != low else ""))
  _number("log_every_s", c.log_every_s)
  for study in ("fig1a", "fig1b", "fig2", "fig3"):
    _choices(f"{study}.methods", _split(c[study].methods), METHODS)
  _positive("fig1b.support", c.fig1b.support)
  if "fig1b" in studies and not p.s <= c.fig1b.support <= p.d:
    raise ConfigError(f"fig1b.support: expected problem.s={p.s} <= support <= problem.d={p.d}, "
                      f"got {c.fig1b.support}")
  _choices("fig1c.readouts", _split(c.fig1c.readouts), READOUTS)
  _choices("tf.readout", [c.tf.readout], READOUTS)
  ks = _ints("layers.ks", c.layers.ks)
  if "layers" in studies and not ks:
    raise ConfigError("layers.ks: expected at least one depth K >= 1, got none")
  for k in ks:
    _positive("layers.ks", k)
  _positive("layers.steps", c.layers.steps, 0)
  _number("layers.bound", c.layers.bound, strict=True)   # the construction's B (Appendix C)
  _positive("lista.num_layers", c.lista.num_layers)
  lt = c.lista_train
  for f in ("steps", "batch", "matrices_per_batch", "steps_per_epoch", "steps_per_call", "checkpoint_every"):
    _positive(f"lista_train.{f}", lt[f])
  _multiple("lista_train.batch", lt.batch, "lista_train.matrices_per_batch", lt.matrices_per_batch)
  _multiple("lista_train.steps_per_epoch", lt.steps_per_epoch, "lista_train.steps_per_call", lt.steps_per_call)
  _multiple("lista_train.checkpoint_every", lt.checkpoint_every, "lista_train.steps_per_call", lt.steps_per_call)
  tt = c.tf_train
  for f in ("steps", "batch", "eval_every", "steps_per_call", "checkpoint_every"):
    _positive(f"tf_train.{f}", tt[f])
  _positive("tf_train.warmup_steps", tt.warmup_steps, 0)
  _multiple("tf_train.eval_every", tt.eval_every, "tf_train.steps_per_call", tt.steps_per_call)
  _multiple("tf_train.checkpoint_every", tt.checkpoint_every, "tf_train.steps_per_call", tt.steps_per_call)
  method_learning_rates(lt.method_learning_rates)
  method_clip_norms(lt.method_clip_norms)
  for sec in ("lista_train", "tf_train"):
    _number(f"{sec}.learning_rate", c[sec].learning_rate, strict=True)
    _number(f"{sec}.clip_norm", c[sec].clip_norm)          # 0: off; < 0 would ascend the gradient
    _number(f"{sec}.end_lr_factor", c[sec].end_lr_factor)
  _number("lista.lam", c.lista.lam)
  _number("eval.lam", c.eval.lam)
  classical_lams(c)
  for f in ("small_tf_layers", "small_tf_heads", "gpt2_layers", "gpt2_width", "gpt2_heads"):
    _positive(f"tf.{f}", c.tf[f])
  if c.tf.gpt2_width % c.tf.gpt2_heads:
    raise ConfigError(f"tf.gpt2_width: expected a multiple of tf.gpt2_heads={c.tf.gpt2_heads}, "
                      f"got {c.tf.gpt2_width}")
  if not c.tf.small_tf_score_clip >= 0:
    raise ConfigError(f"tf.small_tf_score_clip: expected 0 (off) or a cap > 0, got {c.tf.small_tf_score_clip}")
  if c.tf.loss_on not in ("query", "all"):
    raise ConfigError(f"tf.loss_on: unknown name {c.tf.loss_on!r}; allowed: query, all")
  for f in ("num_tasks", "curve_tasks", "iters"):
    _positive(f"eval.{f}", c.eval[f])
  for n in _ints("eval.prompt_lengths", c.eval.prompt_lengths):
    if n < 1:  # values above problem.n are allowed: prompt-length generalisation beyond N
      raise ConfigError(f"eval.prompt_lengths: expected positive integers (n >= 1 demonstrations), got {n}")
  _positive("checkpoint.keep", c.checkpoint.keep)
  _positive("cpu_devices", c.cpu_devices, 0)
  if c.matmul_precision not in MATMUL_PRECISIONS:
    raise ConfigError(f"matmul_precision: expected one of {', '.join(MATMUL_PRECISIONS)}, "
                      f"got {c.matmul_precision!r}")
  devices = jax.device_count()
  if devices > 1:
    for f in ("lista_train.batch", "tf_train.batch"):
      sec, name = f.split(".")
      _multiple(f, c[sec][name], "the device count", devices)


def multihost_kwargs(c) -> dict:
  """`jax.distributed.initialize` arguments from the config's multihost fields (those set)."""
  kwargs = {}
  if c.coordinator_address:
    kwargs["coordinator_address"] = str(c.coordinator_address)
  if c.num_processes:
    _positive("num_processes", c.num_processes, 1)
    kwargs["num_processes"] = c.num_processes
  if c.process_id != -1:
    _positive("process_id", c.process_id, 0)
    if c.num_processes and c.process_id >= c.num_processes:
      raise ConfigError(f"process_id: expected 0 .. num_processes - 1 = {c.num_processes - 1}, "
                        f"got {c.process_id}")
    kwargs["process_id"] = c.process_id
  if kwargs and not c.multihost:
    raise ConfigError(f"multihost: the fields {', '.join(kwargs)} are set but multihost is False; "
                      "pass --config.multihost=True")
  return kwargs


def cpu_device_count(c, workdir: str | None = None) -> int:
  """The CPU device count `experiments.main` sets before JAX starts (config field cpu_devices).

  Auto (0) first looks in `workdir` for an unfinished job and reuses the device count it was
  trained on (`DEVICES_FILE`): a resumed job must keep it to continue its exact trajectory, and
  the automatic count depends on the cores this process may use (e.g. under `taskset`)."""
  _positive("cpu_devices", c.cpu_devices, 0)
  for f in ("tf_train.batch", "lista_train.batch"):   # read below, before `validate` runs
    sec, name = f.split(".")
    _positive(f, c[sec][name])
  if c.cpu_devices:
    return c.cpu_devices
  recorded = unfinished_job_devices(workdir) if workdir else None
  if recorded:
    return recorded
  return distributed.auto_cpu_devices([c.tf_train.batch, c.lista_train.batch])


# Per job: the device count and platform its training started on.
DEVICES_FILE = "devices.json"


def unfinished_job_devices(workdir: str) -> int | None:
  """The CPU device count recorded by the most recently started unfinished job in `workdir`."""
  found = []
  for name in (os.listdir(workdir) if os.path.isdir(workdir) else []):
    path = os.path.join(workdir, name, DEVICES_FILE)
    if os.path.exists(path) and not os.path.exists(os.path.join(workdir, name, "results.json")):
      rec = json.load(open(path))
      if rec.get("platform") == "cpu":
        found.append((os.path.getmtime(path), int(rec["devices"])))
  return max(found)[1] if found else None


def check_job_devices(jobdir: str, has_checkpoint: bool) -> None:
  """Records the job's device count at its first launch; refuses to resume it on another count.

  Data-parallel training sums the per-device gradients in an order that depends on the device
  count, so a job resumed on a different count continues a different float trajectory and would
  end at numbers no uninterrupted run gives (seen: 1.047 on one device, 0.985 on two, 1.026 when
  switched half way)."""
  path = os.path.join(jobdir, DEVICES_FILE)
  now = {"devices": jax.device_count(), "platform": jax.default_backend()}
  if has_checkpoint and os.path.exists(path):
    was = json.load(open(path))
    if (was["devices"], was["platform"]) != (now["devices"], now["platform"]):
      hint = (f"relaunch with --config.cpu_devices={was['devices']}" if was["platform"] == "cpu"
              else f"relaunch on {was['devices']} {was['platform']} devices")
      raise ConfigError(
          f"cpu_devices: {jobdir} was trained on {was['devices']} {was['platform']} device(s), this "
          f"launch has {now['devices']} {now['platform']}; the resumed trajectory would differ from "
          f"an uninterrupted run (float rounding of the gradient all-reduce): {hint}, or use a new "
          "--workdir")
  elif jax.process_index() == 0 and not has_checkpoint:
    writers.write_json(path, now)


# ---------------------------------------------------------------------------------------------
# Jobs.


class Job:
  """One trained model: a method, a support prior, a Small TF read-out or a LISTA depth K."""

  def __init__(self, method: str, *, support=None, readout: str | None = None, num_layers: int | None = None):
    self.method, self.support, self.readout, self.num_layers = method, support, readout, num_layers
    name = method
    if support:
      name += f"-support{support}"
    if readout is not None and method == "small_tf":
      name += f"-{readout}"
    if num_layers is not None:
      name += f"-K{num_layers}"
    self.name = name

  @property
  def family(self) -> str:
    return "tf" if self.method in TF_METHODS else "lista"

  @property
  def lista_method(self) -> str:
    return self.method.replace("_meta", "")

  @property
  def protocol(self) -> str:
    return "fixed" if self.method in FIXED_X else "meta"

  @property
  def prior_support(self):
    """The support prior the method itself applies (LISTA-VM-SS masks X's other columns and its
    iterate); None for every other method, which sees the support only through its data."""
    return self.support if self.lista_method == "lista_vm_ss" else None


def plan_jobs(c) -> list[Job]:
  """The distinct jobs the config's studies need, in a stable order."""
  studies = _split(c.studies)
  jobs: dict[str, Job] = {}

  def add(job):
    jobs.setdefault(job.name, job)

  def method_job(m, support=None):
    return Job(m, support=support, readout=c.tf.readout if m == "small_tf" else None)

  for study, support in (("fig1a", None), ("fig1b", c.fig1b.support)):
    if study in studies:
      for m in _split(c[study].methods):
        add(method_job(m, support))
  if "fig1c" in studies:
    for r in _split(c.fig1c.readouts):
      add(Job("small_tf", readout=r))
  for study in ("fig2", "fig3"):
    if study in studies:
      for m in _split(c[study].methods):
        add(method_job(m))
  if "layers" in studies:
    for k in _ints("layers.ks", c.layers.ks):
      add(Job("lista_vm", num_layers=k))
  return list(jobs.values())


def _method_numbers(field: str, spec: str, what: str, allow_zero: bool) -> dict[str, float]:
  """Parses "lista_vm=1e-2,alista=1e-2" into {method: number}, each finite and > 0 (>= 0 with
  allow_zero), naming `field` in the ConfigError."""
  out = {}
  for item in _split(spec):
    name, sep, value = item.partition("=")
    try:
      v = float(value)
    except ValueError:
      v = -1.0
    if not sep or name not in lista.METHODS or not (0 <= v if allow_zero else 0 < v) or not v < math.inf:
      raise ConfigError(f"{field}: expected comma-separated METHOD={what} with METHOD in {lista.METHODS} "
                        f"and a finite {what} {'>= 0' if allow_zero else '> 0'}, got {item!r}")
    out[name] = v
  return out


def method_learning_rates(spec: str) -> dict[str, float]:
  """Parses "lista_vm=1e-2,alista=1e-2" (per-method Adam learning rates of the LISTA family)."""
  return _method_numbers("lista_train.method_learning_rates", spec, "LR", allow_zero=False)


def method_clip_norms(spec: str) -> dict[str, float]:
  """Parses "lista_vm_ss=10" (per-method gradient-clip norms of the LISTA family; 0: off)."""
  return _method_numbers("lista_train.method_clip_norms", spec, "CLIP", allow_zero=True)


def lista_lr_and_clip(c, job: Job) -> tuple[float, float | None]:
  """The Adam peak rate and global-norm clip (None: off) a LISTA-family job trains with:
  lista_train.method_learning_rates / method_clip_norms for its method, else learning_rate /
  clip_norm."""
  lt = c.lista_train
  lr = method_learning_rates(lt.method_learning_rates).get(job.lista_method, lt.learning_rate)
  clip = method_clip_norms(lt.method_clip_norms).get(job.lista_method, lt.clip_norm)
  return lr, clip or None


def score_clip(c, job: Job) -> float | None:
  """The attention-weight cap of a Small TF job (tf.small_tf_score_clip; 0: none, the paper's)."""
  return (c.tf.small_tf_score_clip or None) if job.method == "small_tf" else None


def fixed_X(c) -> jax.Array:
  """The one measurement matrix of the classical LISTA protocol (shared by all seeds)."""
  return jax.random.normal(jax.random.fold_in(jax.random.key(c.seed), 7), (c.problem.n, c.problem.d))


def make_objective(c, job: Job) -> tuple[train.Objective, Any, int, int, int, int]:
  """(objective, optimizer, steps, steps_per_call, eval_every, checkpoint_every) of a job."""
  p = c.problem
  if job.family == "lista":
    lt = c.lista_train
    steps = lt.steps if job.num_layers is None else c.layers.steps
    batch, matrices = lt.batch, lt.matrices_per_batch
    objective = lista.make_objective(
        job.lista_method, protocol=job.protocol, d=p.d, n=p.n, s=p.s, support=job.support,
        num_layers=job.num_layers or c.lista.num_layers, batch=batch,
        matrices_per_batch=None if job.protocol == "fixed" else matrices,
        X_fixed=fixed_X(c) if job.protocol == "fixed" else None, lam=c.lista.lam,
        noise_std=p.noise_std)
    lr, clip = lista_lr_and_clip(c, job)
    optimizer = train.make_optimizer(lr, clip_norm=clip,
                                     decay_steps=steps if lt.cosine_decay else None,
                                     end_lr_factor=lt.end_lr_factor)
    return objective, optimizer, steps, lt.steps_per_call, lt.steps_per_epoch, lt.checkpoint_every
  from l2o_jax import transformer
  tt = c.tf_train
  if job.method == "small_tf":
    kw = dict(num_layers=c.tf.small_tf_layers, num_heads=c.tf.small_tf_heads,
              score_clip=score_clip(c, job))
  else:
    kw = dict(num_layers=c.tf.gpt2_layers, width=c.tf.gpt2_width, num_heads=c.tf.gpt2_heads)
  objective = transformer.make_objective(
      job.method, d=p.d, n=p.n, s=p.s, support=job.support, batch=tt.batch,
      readout=job.readout or "query", loss_on=c.tf.loss_on, noise_std=p.noise_std, **kw)
  optimizer = train.make_optimizer(
      tt.learning_rate, clip_norm=tt.clip_norm or None, warmup_steps=tt.warmup_steps,
      decay_steps=tt.steps if tt.cosine_decay else None, end_lr_factor=tt.end_lr_factor)
  return objective, optimizer, tt.steps, tt.steps_per_call, tt.eval_every, tt.checkpoint_every


# Salts of the fixed test sets (fold_in of the eval seed): 1 the training curves, 2 the final
# numbers (N = problem.n demonstrations), 3 the fixed-X methods on their training X, 4 the
# prompt-length curves (n_max = max(eval.prompt_lengths, problem.n) demonstrations).
CURVE_SALT, FINAL_SALT, FIXED_X_SALT, PROMPT_LENGTH_SALT = 1, 2, 3, 4


def test_tasks(c, num_tasks: int, *, support=None, X=None, salt: int = 0, n: int | None = None) -> L.Task:
  """A fixed test set: fresh instances (varying X by default) from the eval seed; `n`
  demonstrations per prompt (default problem.n)."""
  p = c.problem
  key = jax.random.fold_in(jax.random.key(c.eval.seed), salt)
  return L.sample_tasks(key, num_tasks, d=p.d, n=p.n if n is None else n, s=p.s, support=support,
                        noise_std=p.noise_std, X=X)


def test_set_signature(c) -> dict:
  """The config fields that, with a salt, a size and a support prior, fix `test_tasks`'s set:
  two runs with equal signatures score on the same tasks (`experiments.spread --with`)."""
  p = c.problem
  return {"eval_seed": int(c.eval.seed), "d": int(p.d), "n": int(p.n), "s": int(p.s),
          "noise_std": float(p.noise_std)}


def _seed_params(params, i: int):
  return jax.tree_util.tree_map(lambda x: x[i], params)


def _lengths(c) -> list[int]:
  """The prompt lengths n of the per-prompt-length curves, sorted ("" = 1..2N)."""
  return sorted(set(_ints("eval.prompt_lengths", c.eval.prompt_lengths))) or list(range(1, 2 * c.problem.n + 1))


def prompt_length_tasks(c, *, support=None) -> L.Task:
  """The test set of the per-prompt-length curves: eval.num_tasks fresh instances with
  n_max = max(eval.prompt_lengths, problem.n) demonstrations (salt PROMPT_LENGTH_SALT); a curve
  at length n uses the first n. Models and references with the same support prior share it."""
  n_max = max(_lengths(c) + [c.problem.n])
  return test_tasks(c, c.eval.num_tasks, support=support, salt=PROMPT_LENGTH_SALT, n=n_max)


def has_prompt_lengths(job: Job) -> bool:
  """Jobs with per-prompt-length curves: the Transformers and LISTA-VM(-SS), whose weights do not
  depend on n. LISTA / LISTA-CP / ALISTA hold n-shaped weights for their N rows: none."""
  return job.family == "tf" or job.lista_method in ("lista_vm", "lista_vm_ss")


def max_demonstrations(job: Job, params_i) -> int | None:
  """The most demonstrations a job's model accepts (None: any n). GPT-2's learned position table
  holds max_points = problem.n + 1 points (`transformer.init_params`), so n <= max_points - 1."""
  if job.method == "gpt2":
    from l2o_jax.transformer import gpt2
    return gpt2.config(params_i)["max_points"] - 1
  return None


def _truncate(task: L.Task, n: int) -> L.Task:
  return task._replace(X=task.X[:, :n], y=task.y[:, :n])


def evaluate_job(c, job: Job, params_i, task: L.Task, *, full: bool, fixed_task=None, ppl_task=None) -> dict:
  """Test numbers of one seed's parameters on `task` (and on `fixed_task` for fixed-X methods).

  With `full`, the per-prompt-length curve (every n in eval.prompt_lengths the model accepts)
  comes from `ppl_task` (`prompt_length_tasks`; default `task`)."""
  ppl_task = task if ppl_task is None else ppl_task
  lengths = [n for n in _lengths(c) if n <= ppl_task.X.shape[1]]
  if job.family == "tf":
    from l2o_jax import transformer
    clip = score_clip(c, job)
    ev = transformer.evaluate(job.method, params_i, task, score_clip=clip)
    out = {"pred_error": ev["pred_error"]}
    if full:
      out["pred_error_median"], out["pred_error_ci95"] = ev["pred_error_median"], list(ev["pred_error_ci95"])
      limit = max_demonstrations(job, params_i)
      if limit is not None and ppl_task.X.shape[1] > limit:
        ppl_task = _truncate(ppl_task, limit)  # evaluate only the prompts the model can hold
      ev = transformer.evaluate(job.method, params_i, ppl_task, score_clip=clip)
      out["per_prompt_length"] = {int(n): float(v) for n, v in ev["per_prompt_length"].items()
                                  if int(n) in lengths}
    return out
  support = job.prior_support
  ev = lista.evaluate(job.lista_method, params_i, task, support=support)
  out = {"pred_error": ev["pred_error"]}
  if not full:
    return out
  out["pred_error_median"], out["pred_error_ci95"] = ev["pred_error_median"], list(ev["pred_error_ci95"])
  out["per_layer"] = ev["per_layer"]
  out["beta_nmse_db"] = ev["beta_nmse_db"]
  if fixed_task is not None:
    out["pred_error_fixed_x"] = lista.evaluate(job.lista_method, params_i, fixed_task)["pred_error"]
  if has_prompt_lengths(job):
    # LISTA-VM's weights do not depend on n (eq. 4.4), so it runs on any prompt length.
    est = jax.jit(jax.vmap(lambda X, y: lista.apply(job.lista_method, params_i, X, y, support=support)))
    out["per_prompt_length"] = L.per_prompt_length(est, ppl_task, lengths)
  if job.num_layers is not None:
    from l2o_jax import transformer
    # Theorem 4.1: the explicitly constructed Transformer runs these LISTA-VM weights.
    # LISTA-VM uses max(theta, 0) (lista.py stores raw thresholds); the construction wants theta >= 0.
    vm = {"M": params_i["M"], "theta": jnp.maximum(params_i["theta"], 0.0)}
    tf_params = transformer.small_tf_from_construction(vm, jnp.float32(c.layers.bound), readout="query_dagger")
    out["constructed_tf_pred_error"] = transformer.evaluate("small_tf", tf_params, task)["pred_error"]
  return out


def prompt_length_note(c, job: Job, params_i) -> dict:
  """{"per_prompt_length_skipped": [n...], "per_prompt_length_note": why} for a job whose model
  cannot take some of eval.prompt_lengths (GPT-2 beyond its position table); {} otherwise."""
  limit = max_demonstrations(job, params_i)
  skipped = [n for n in _lengths(c) if limit is not None and n > limit]
  if not skipped:
    return {}
  return {"per_prompt_length_skipped": skipped,
          "per_prompt_length_note": f"its learned position table holds max_points = {limit + 1} points "
                                    f"(n <= {limit} demonstrations); longer prompts are not evaluated"}


def _stats(values: list[float]) -> dict:
  arr = np.asarray(values, np.float64)
  return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
          "per_seed": [float(v) for v in arr]}


def aggregate(per_seed: list[dict]) -> dict:
  """Mean / std / per-seed values of every number (lists and {n: value} dicts element-wise)."""
  out = {}
  for key, first in per_seed[0].items():
    if isinstance(first, dict):
      out[key] = {str(k): _stats([r[key][k] for r in per_seed]) for k in first}
    elif isinstance(first, list):
      out[key] = [_stats([r[key][i] for r in per_seed]) for i in range(len(first))]
    else:
      out[key] = _stats([r[key] for r in per_seed])
  return out


def run_job(c, job: Job, workdir: str, *, mesh, stop: Callable[[], bool], log: Callable[[str], None]) -> dict | None:
  """Trains (or resumes) one job and writes its outputs; None when interrupted by a signal."""
  jobdir = os.path.join(workdir, job.name)
  results_path = os.path.join(jobdir, "results.json")
  objective, optimizer, steps, spc, eval_every, ckpt_every = make_objective(c, job)
  if os.path.exists(results_path):
    done = json.load(open(results_path))
    if done.get("steps") == steps:
      log(f"[{job.name}] already done ({steps} steps); results in {results_path}")
      return done
  os.makedirs(jobdir, exist_ok=True)
  if mesh.devices.size > 1:
    objective = distributed.data_parallel(objective, mesh)
  seeds = [c.seed + i for i in range(c.seeds)]
  checkpointer = ckpt_lib.Checkpointer(os.path.join(jobdir, "checkpoints"), max_to_keep=c.checkpoint.keep)
  try:
    check_job_devices(jobdir, checkpointer.latest_step() is not None)
  except ConfigError:
    checkpointer.close()
    raise
  chief = jax.process_index() == 0  # multi-host: one process writes the logs
  metrics_path = os.path.join(jobdir, "metrics.jsonl")
  events = writers.EventWriter(jobdir) if chief else None
  metrics_log = None
  curve_task = test_tasks(c, c.eval.curve_tasks, support=job.support, salt=CURVE_SALT)
  batch = c.lista_train.batch if job.family == "lista" else c.tf_train.batch
  t_start = time.time()

  def on_chunk(step, state, metrics):
    nonlocal metrics_log
    if metrics_log is None and chief:
      # Opened at the first evaluation: a resumed run drops the lines of the steps it recomputes.
      metrics_log = writers.JsonlWriter(metrics_path, truncate_after_step=step - 1)
    errs = [evaluate_job(c, job, _seed_params(state.params, i), curve_task, full=False)["pred_error"]
            for i in range(len(seeds))]
    loss = train.finite_mean(metrics["loss"])   # skipped (non-finite) steps left out
    record = {"step": step, "epoch": step / eval_every if job.family == "lista" else None,
              "train_loss": float(loss.mean()), "train_loss_per_seed": loss.tolist(),
              "test_pred_error": float(np.mean(errs)), "test_pred_error_per_seed": errs,
              "time_s": time.time() - t_start}
    if not chief:
      return
    metrics_log.write(record)
    scalars = {"train/loss": record["train_loss"], "test/pred_error": record["test_pred_error"]}
    scalars.update({f"test/pred_error_seed{s}": e for s, e in zip(seeds, errs)})
    events.scalars(step, scalars)

  log(f"[{job.name}] training {steps} steps x {batch} instances, seeds {seeds}"
      + (f", {mesh.devices.size} devices" if mesh.devices.size > 1 else ""))
  try:
    result = train.fit(
        objective, optimizer, steps, seeds=seeds, steps_per_call=max(1, min(spc, steps)),
        checkpointer=checkpointer, checkpoint_every=ckpt_every, eval_every=eval_every,
        place=(lambda s: distributed.replicate(s, mesh)) if mesh.devices.size > 1 else None,
        on_chunk=on_chunk, should_stop=stop, instances_per_step=batch,
        log_every_s=c.log_every_s, log_fn=lambda m: log(f"[{job.name}] {m}"),
        skip_nonfinite=(c.lista_train if job.family == "lista" else c.tf_train).skip_nonfinite)
  finally:
    for w in (metrics_log, events):
      if w is not None:
        w.close()
    checkpointer.close()
  if result.interrupted:
    return None
  task = test_tasks(c, c.eval.num_tasks, support=job.support, salt=FINAL_SALT)
  fixed_task = (test_tasks(c, c.eval.num_tasks, support=job.support, X=fixed_X(c), salt=FIXED_X_SALT)
                if job.method in FIXED_X else None)
  ppl_task = prompt_length_tasks(c, support=job.support) if has_prompt_lengths(job) else None
  per_seed = [evaluate_job(c, job, _seed_params(result.state.params, i), task, full=True,
                           fixed_task=fixed_task, ppl_task=ppl_task) for i in range(len(seeds))]
  out = {"job": job.name, "method": job.method, "support": job.support, "readout": job.readout,
         "num_layers": job.num_layers or (c.lista.num_layers if job.family == "lista" else None),
         "family": job.family, "protocol": job.protocol if job.family == "lista" else None,
         "steps": steps, "seeds": seeds, "steps_per_epoch": eval_every if job.family == "lista" else None,
         # skipped steps are counted by this process: since `resumed_from_step` when resumed
         "skipped_nonfinite_steps": result.skipped, "resumed_from_step": result.resumed_from,
         "curve": writers.read_jsonl(metrics_path) if os.path.exists(metrics_path) else [],
         **aggregate(per_seed), **prompt_length_note(c, job, _seed_params(result.state.params, 0))}
  if chief:
    writers.write_json(results_path, out)
  log(f"[{job.name}] test prediction error {out['pred_error']['mean']:.4g}"
      + (f" +- {out['pred_error']['std']:.2g}" if len(seeds) > 1 else "")
      + (f" (fixed X: {out['pred_error_fixed_x']['mean']:.4g})" if "pred_error_fixed_x" in out else ""))
  return out


# ---------------------------------------------------------------------------------------------
# References (no training): ISTA / FISTA / LASSO / oracle, and the classical table.


# The oracle solves every S-subset of the support for every test task at once (vmap): at the
# paper's C(20, 3) = 1,140 that is ~0.6 GB for 4,096 tasks; far beyond it, it would exhaust
# memory after all the training, so larger settings leave it out (noted in results.json).
ORACLE_MAX_SUPPORTS = 5000


def oracle_supports(c, support=None) -> int:
  """C(|support| or d, S): least-squares solves per task of the exhaustive-support oracle."""
  return math.comb(support or c.problem.d, c.problem.s)


def references(c, *, support=None, ks=None, prompt_lengths: bool = True) -> dict:
  """ISTA, FISTA (K = eval.iters, or every K in `ks`), converged LASSO and the oracle."""
  p, lam = c.problem, c.eval.lam
  task = test_tasks(c, c.eval.num_tasks, support=support, salt=FINAL_SALT)
  err = lambda beta: float(L.prediction_error(task.y_query, task.x_query, beta))
  out = {}
  K = max([c.eval.iters] + list(ks or []))
  for name, solver in (("ista", L.ista), ("fista", L.fista)):
    traj = jax.jit(jax.vmap(lambda X, y: solver(X, y, lam, K, return_trajectory=True)))(task.X, task.y)
    per_task = np.asarray((task.y_query[:, None] - jnp.einsum("bd,bkd->bk", task.x_query, traj)) ** 2)
    errs = per_task.mean(0)
    out[name] = float(errs[c.eval.iters - 1])
    out[f"{name}_median"] = float(L.median_error(per_task[:, c.eval.iters - 1]))
    out[f"{name}_ci95"] = list(L.mean_interval(per_task[:, c.eval.iters - 1]))
    out[f"{name}_per_k"] = {int(k): float(errs[k - 1]) for k in (ks or [])}
    out[f"{name}_per_layer"] = [float(e) for e in errs[:c.eval.iters]]
  beta = jax.jit(jax.vmap(lambda X, y: L.lasso(X, y, lam)))(task.X, task.y)
  out["lasso"] = err(beta)
  lasso_errors = L.prediction_errors(task.y_query, task.x_query, beta)
  out["lasso_median"] = float(L.median_error(lasso_errors))
  out["lasso_ci95"] = list(L.mean_interval(lasso_errors))
  if oracle_supports(c, support) <= ORACLE_MAX_SUPPORTS:
    out["oracle"] = err(jax.jit(jax.vmap(lambda X, y: L.best_subset(X, y, p.s, support)))(task.X, task.y))
  else:
    out["oracle_skipped"] = (f"C({support or p.d}, {p.s}) = {oracle_supports(c, support):,} supports per task, "
                             f"over {ORACLE_MAX_SUPPORTS:,}")
  if prompt_lengths:
    out.update(reference_prompt_lengths(c, support=support))
  out["lam"], out["iters"] = lam, c.eval.iters
  return out


def reference_solvers(c) -> dict:
  """{"ista", "fista", "lasso"}: single-instance (X, y) -> beta at eval.lam (K = eval.iters)."""
  lam = c.eval.lam
  return {"ista": lambda X, y: L.ista(X, y, lam, c.eval.iters),
          "fista": lambda X, y: L.fista(X, y, lam, c.eval.iters),
          "lasso": lambda X, y: L.lasso(X, y, lam)}


def reference_prompt_lengths(c, *, support=None) -> dict:
  """{ista,fista,lasso}_per_prompt_length: every n in eval.prompt_lengths (also beyond N: the
  solvers take any n) on the prompt-length test set shared with the models."""
  task = prompt_length_tasks(c, support=support)
  out = {}
  for name, solver in reference_solvers(c).items():
    out[f"{name}_per_prompt_length"] = _per_prompt_length_masked(solver, task, _lengths(c))
  return out


def _per_prompt_length_masked(solver, task: L.Task, lengths) -> dict[int, float]:
  """`metrics.per_prompt_length` for solvers of (1/2)||y - X b||^2 + lam ||b||_1 in ONE compile.

  Zeroing demonstrations n+1..N leaves X^T X, X^T y and the Lipschitz constant unchanged, so
  ISTA / FISTA / LASSO on the zero-padded prompt equal the same solvers on the first n rows.
  """
  @jax.jit
  def err(n):
    keep = (jnp.arange(task.X.shape[1]) < n).astype(task.X.dtype)
    beta = jax.vmap(solver)(task.X * keep[None, :, None], task.y * keep[None, :])
    return L.prediction_error(task.y_query, task.x_query, beta)

  return {int(n): float(err(n)) for n in lengths}


def classical(c, workdir: str, log) -> str:
  from experiments import classical as classical_lib
  lams = classical_lams(c)
  rows = classical_lib.classical_rows(seed=c.eval.seed, num_tasks=c.eval.num_tasks, lams=lams,
                                      num_iters=c.eval.iters, d=c.problem.d, n=c.problem.n, s=c.problem.s,
                                      noise_std=c.problem.noise_std, include_oracle=oracle_supports(c) <= ORACLE_MAX_SUPPORTS)
  table = classical_lib.format_table(rows, num_iters=c.eval.iters)
  writers.write_json(os.path.join(workdir, "classical.json"), rows)
  with open(os.path.join(workdir, "classical.md"), "w") as f:
    f.write(table + "\n")
  log(f"classical table (prediction error, {c.eval.num_tasks} fresh tasks, d={c.problem.d}, "
      f"N={c.problem.n}, S={c.problem.s}):\n{table}")
  return table


# ---------------------------------------------------------------------------------------------
# The whole run.


def check_workdir(c, workdir: str, log) -> None:
  """Writes the resolved config; a relaunch must use the same config (bar RELAUNCH_MAY_CHANGE)."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  new = json.loads(c.to_json())
  if os.path.exists(path):
    old = json.load(open(path))
    was = {**ADDED_FIELDS, **_flat(old)}
    diff = sorted(k for k in set(was) | set(_flat(new))
                  if was.get(k) != _flat(new).get(k) and k not in RELAUNCH_MAY_CHANGE)
    if diff:
      raise ConfigError(
          f"workdir: {workdir} holds a run with a different config (fields {', '.join(diff)}); its "
          "checkpoints and results would not match. Use a new --workdir (or the old config).")
  if jax.process_index() != 0:
    return   # with several processes (whose process_id differs) one writes, or they would race
  if os.path.exists(path) and json.load(open(path)) != new:
    stamp, n = time.strftime('%Y%m%d-%H%M%S'), 0
    while os.path.exists(backup := os.path.join(workdir, f"config.{stamp}{f'-{n}' if n else ''}.json")):
      n += 1
    shutil.copyfile(path, backup)   # a copy: config.json never disappears for another reader
  writers.write_json(path, new)


def _merge_references(old: dict, new: dict) -> dict:
  """References of earlier launches updated with this one's, two levels deep: a launch without
  the layers study computes ISTA / FISTA at no extra depth (`ista_per_k` = {}), which must not
  wipe an earlier launch's depth curve. Same config and test set, so shared entries agree.
  `old` comes from JSON, whose keys are strings ({"2": ...} for n = 2): this launch's int keys are
  made strings too, as one dict holding both could not be written (json sort_keys fails)."""
  new = json.loads(json.dumps(new))
  out = dict(old)
  for name, refs in new.items():
    merged = dict(old.get(name, {}))
    for key, value in refs.items():
      merged[key] = {**merged[key], **value} if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    out[name] = merged
  return out


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def matmul_precision(c):
  """Context in which every matmul traced uses config.matmul_precision (`jax.default_matmul_precision`)."""
  return jax.default_matmul_precision(MATMUL_PRECISIONS[c.matmul_precision])


def run(c, workdir: str, *, log: Callable[[str], None] = print) -> dict | None:
  """Runs every study of config `c` in `workdir`; returns the aggregated results (None if stopped)."""
  validate(c)
  with matmul_precision(c):
    return _run(c, workdir, log)


def _run(c, workdir, log):
  # Earlier launches' results; read before check_workdir rewrites config.json, as a workdir from
  # before "job_lists" existed has its lists only there (they could not change then, so the last
  # config.json's lists hold for every study its results.json names).
  path, cfg_path = os.path.join(workdir, "results.json"), os.path.join(workdir, "config.json")
  old = json.load(open(path)) if os.path.exists(path) else {}
  earlier = old.get("job_lists")
  if earlier is None and os.path.exists(cfg_path):
    last = {**json.loads(c.to_json()), **json.load(open(cfg_path))}
    widen(last, old)
    earlier = job_lists(last)
  check_workdir(c, workdir, log)
  studies = _split(c.studies)
  mesh = distributed.data_mesh()
  results: dict[str, Any] = {"config": c.name, "studies": studies, "jobs": {}, "references": {}}
  t0 = time.time()
  with train.StopOnSignal() as stop:
    for job in plan_jobs(c):
      # A signal during the previous job's last chunk or final evaluation: that job finished,
      # and starting the next one (compiling, a whole chunk) would outlast a scheduler's grace.
      out = None if stop() else run_job(c, job, workdir, mesh=mesh, stop=stop, log=log)
      if out is None:
        log(f"stopped by signal {stop.signum}; checkpoints saved; relaunch the same command to resume")
        return None
      results["jobs"][job.name] = out
  ks = _ints("layers.ks", c.layers.ks) if "layers" in studies else None
  if "fig1a" in studies or "layers" in studies:  # the figures that draw reference lines
    results["references"]["none"] = references(c, ks=ks)
  if "fig1b" in studies:
    results["references"][f"support{c.fig1b.support}"] = references(c, support=c.fig1b.support)
  if "classical" in studies:
    results["classical_table"] = classical(c, workdir, log)
  results["wall_time_s"] = time.time() - t0
  results["job_lists"] = job_lists(c, earlier)
  if old:
    # A relaunch may run other studies or jobs (studies, name, JOB_LISTS may change): keep what
    # the earlier launches computed, so the workdir's results.json covers every job run in it.
    results["studies"] = [s for s in old.get("studies", []) if s not in studies] + studies
    results["jobs"] = {**old.get("jobs", {}), **results["jobs"]}
    results["references"] = _merge_references(old.get("references", {}), results["references"])
    if "classical_table" not in results and "classical_table" in old:
      results["classical_table"] = old["classical_table"]
  writers.write_json(path, results)
  log(f"done in {time.time() - t0:.0f}s; results in {os.path.join(workdir, 'results.json')}")
  return results
