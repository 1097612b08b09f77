"""A finished job's trained model, for your own analysis in JAX.

  from experiments import trained
  m = trained.load("runs/fig3", "lista_vm")        # the final checkpoint of runs/fig3/lista_vm
  y_hat = jax.vmap(m.predict)(X, y, x_query)       # query predictions, one instance per call
  beta = jax.vmap(m.estimate)(X, y)                # the LISTA family's beta estimate (eq. 4.4 etc.)
  m.params, m.config, m.job, m.seed                # raw weights, the run's resolved config, ...

`predict(X (n, d), y (n,), x_query (d,)) -> ()` is the same model the run scored: LISTA-type
methods predict x_query^T beta_hat (with the job's support prior for LISTA-VM-SS), the
Transformers their query read-out (with the run's `tf.small_tf_score_clip`). `estimate` is None for
the Transformers. Both are pure and jit/vmap-able; n may differ from the training N where the
model allows it (LISTA-VM(-SS), Small TF; not GPT-2 beyond N + 1 points, nor LISTA / LISTA-CP /
ALISTA, whose weights are shaped by N).
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, NamedTuple


class Trained(NamedTuple):
  config: Any                 # the run's resolved ml_collections config (config.json over today's defaults)
  job: Any                    # experiments.runner.Job
  seed: int                   # the training seed of these parameters
  params: Any                 # one seed's parameters
  predict: Callable           # (X, y, x_query) -> y_hat_query
  estimate: Callable | None   # (X, y) -> beta_hat (LISTA family), else None


def load_config(workdir: str):
  """The run's resolved config (config.json) over the current defaults, so fields added since
  the run keep their defaults, with `studies` covering every launch into the workdir."""
  from experiments.configs.base import base
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"workdir: {workdir} has no config.json (not a run directory)")
  c = base()

  def merge(cfg, values):
    for k, v in values.items():
      if isinstance(v, dict) and k in cfg:
        merge(cfg[k], v)
      elif k in cfg:
        cfg[k] = v
  merge(c, json.load(open(path)))
  # A relaunch may run other studies or jobs into the workdir (config.json then names only the
  # latest); results.json lists every one run there, so their jobs stay reachable.
  results = os.path.join(workdir, "results.json")
  if os.path.exists(results):
    from experiments import runner
    runner.widen(c, json.load(open(results)))
  return c


def planned_job(c, name: str):
  """The run's job called `name` (a ValueError listing the run's jobs otherwise)."""
  from experiments import runner
  planned = {j.name: j for j in runner.plan_jobs(c)}
  if name not in planned:
    raise ValueError(f"jobs: {name!r} is not a job of this run; its jobs are {sorted(planned)}")
  return planned[name]


def trained_params(c, job, workdir: str):
  """Parameters (leading seed axis) of a finished job's final checkpoint; a job of 0 steps
  (e.g. layers.steps = 0) is its untrained start, as the run scored it."""
  from experiments import runner
  from l2o_jax import checkpoint as ckpt_lib
  from l2o_jax import train
  objective, optimizer, steps, *_ = runner.make_objective(c, job)
  like = train.init_states(objective, optimizer, [c.seed + i for i in range(c.seeds)])
  if steps == 0:
    return like.params
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, job.name, "checkpoints"))
  try:
    # Read-only: the final step itself, never `restore_latest`, which moves a step that fails
    # to restore aside (a passing read error would then cost a finished job its final state).
    have = ckpt.steps()
    if steps not in have:
      raise ValueError(f"jobs: {job.name} has no final checkpoint (step {steps}) in {workdir}; steps "
                       f"there: {have or 'none'}" + (" (unfinished: relaunch experiments.main first)"
                                                     if not have or max(have) < steps else ""))
    return ckpt.restore(like, steps).params
  finally:
    ckpt.close()


def model(c, job, params_i) -> tuple[Callable, Callable | None]:
  """(predict, estimate) of one seed's parameters `params_i` of `job` under config `c`."""
  from experiments import runner
  if job.family == "tf":
    from l2o_jax import transformer
    clip = runner.score_clip(c, job)
    return (lambda X, y, x_query: transformer.predict(job.method, params_i, X, y, x_query,
                                                      score_clip=clip)[-1]), None
  from l2o_jax import lista
  estimate = lambda X, y: lista.apply(job.lista_method, params_i, X, y, support=job.prior_support)
  return (lambda X, y, x_query: x_query @ estimate(X, y)), estimate


def load(workdir: str, job: str, *, seed: int | None = None) -> Trained:
  """The trained model of job `job` (a directory name of `workdir`, e.g. "lista_vm",
  "lista_vm_ss-support10", "small_tf-query") at its final checkpoint; `seed` picks one of the
  run's training seeds (default: the first, config.seed)."""
  c = load_config(workdir)
  j = planned_job(c, job)
  seeds = [c.seed + i for i in range(c.seeds)]
  seed = seeds[0] if seed is None else seed
  if seed not in seeds:
    raise ValueError(f"seed: expected one of the run's training seeds {seeds}, got {seed!r}")
  from experiments import runner
  params = runner._seed_params(trained_params(c, j, workdir), seeds.index(seed))
  predict, estimate = model(c, j, params)
  return Trained(c, j, seed, params, predict, estimate)
