"""The launcher: config validation, the absl entry point, SIGTERM = save and exit cleanly, and a
tiny end-to-end run (outputs, resume-skips-finished-jobs, config-change guard, report)."""
import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import report, runner, spread, trained, writers
from experiments.configs import quick
from l2o_jax import checkpoint, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, SPC = 40, 5


@pytest.mark.parametrize("overrides, message", [
    ({"fig1a.methods": "lista,transformer"}, r"fig1a.methods: unknown name 'transformer'; allowed: lista, lista_cp"),
    ({"studies": "fig1a,fig9"}, r"studies: unknown name 'fig9'; allowed: fig1a, fig1b"),
    ({"problem.d": 2}, r"problem.s: expected s <= problem.d=2"),
    ({"lista_train.steps": 0}, r"lista_train.steps: expected an integer >= 1, got 0"),
    ({"tf_train.batch": -4}, r"tf_train.batch: expected an integer >= 1, got -4"),
    ({"fig1c.readouts": "query,softmax"}, r"fig1c.readouts: unknown name 'softmax'; allowed: linear, query, query_dagger"),
    ({"lista_train.steps_per_epoch": 7}, r"lista_train.steps_per_epoch: expected a multiple of lista_train.steps_per_call=20"),
    ({"seeds": 0}, r"seeds: expected an integer >= 1"),
    ({"fig1b.support": 30}, r"fig1b.support: expected problem.s=3 <= support <= problem.d=20"),
    ({"eval.prompt_lengths": "2,0,20"}, r"eval.prompt_lengths: expected positive integers \(n >= 1 demonstrations\), got 0"),
    ({"eval.prompt_lengths": "-3"}, r"eval.prompt_lengths: expected positive integers .*, got -3"),
    ({"eval.prompt_lengths": "2,x"}, r"eval.prompt_lengths: expected comma-separated integers, got '2,x'"),
    ({"cpu_devices": -1}, r"cpu_devices: expected an integer >= 0, got -1"),
    ({"matmul_precision": "tf16"}, r"matmul_precision: expected one of float32, default, got 'tf16'"),
    ({"tf.small_tf_score_clip": -1.0}, r"tf.small_tf_score_clip: expected 0 \(off\) or a cap > 0, got -1.0"),
    ({"lista_train.clip_norm": -1.0}, r"lista_train.clip_norm: expected a finite number >= 0, got -1.0"),
    ({"tf_train.end_lr_factor": -1.0}, r"tf_train.end_lr_factor: expected a finite number >= 0, got -1.0"),
    ({"tf_train.learning_rate": float("inf")}, r"tf_train.learning_rate: expected a finite number > 0, got inf"),
    ({"lista_train.method_learning_rates": "lista_vm=inf"}, r"method_learning_rates: .* a finite LR > 0, got 'lista_vm=inf'"),
    ({"lista_train.method_clip_norms": "lista_vm_ss=-1"}, r"method_clip_norms: .* a finite CLIP >= 0, got 'lista_vm_ss=-1'"),
    ({"lista_train.method_clip_norms": "small_tf=10"}, r"method_clip_norms: expected comma-separated METHOD=CLIP with METHOD in"),
    ({"eval.classical_lams": "0.1,abc"}, r"eval.classical_lams: expected comma-separated numbers >= 0, got '0.1,abc'"),
    ({"eval.classical_lams": "0.1,-1"}, r"eval.classical_lams: expected a finite number >= 0, got -1.0"),
    ({"eval.lam": -1.0}, r"eval.lam: expected a finite number >= 0, got -1.0"),
    ({"lista.lam": -1.0}, r"lista.lam: expected a finite number >= 0, got -1.0"),
    # These used to fail only after training, with config.json written: the corrected relaunch
    # was then refused as a different config.
    ({"layers.bound": 0.0}, r"layers.bound: expected a finite number > 0, got 0.0"),
    ({"layers.bound": float("nan")}, r"layers.bound: expected a finite number > 0, got nan"),
    ({"problem.noise_std": float("inf")}, r"problem.noise_std: expected a finite number >= 0, got inf"),
    ({"seed": 2 ** 63}, r"seed: expected an integer whose seeds fit in 64 bits"),
    ({"eval.seed": -2 ** 63 - 1}, r"eval.seed: expected an integer whose seeds fit in 64 bits"),
    ({"log_every_s": float("nan")}, r"log_every_s: expected a finite number >= 0, got nan"),
])
def test_config_validation_names_field_and_allowed_values(overrides, message):
  c = quick.get_config()
  runner.validate(c)  # the shipped config is valid
  for field, value in overrides.items():
    section, _, name = field.rpartition(".")
    (c[section] if section else c)[name] = value
  with pytest.raises(runner.ConfigError, match=message):
    runner.validate(c)


def test_cpu_device_count(monkeypatch):
  from l2o_jax import distributed
  c = quick.get_config()
  monkeypatch.setattr(distributed, "usable_cores", lambda: 3)
  assert c.cpu_devices == 0 and c.tf_train.batch == 64
  assert runner.cpu_device_count(c) == 2           # auto: one per core, dividing tf_train.batch
  c.cpu_devices = 5
  assert runner.cpu_device_count(c) == 5           # an explicit count wins (validate checks batches)
  c.cpu_devices = 1
  assert runner.cpu_device_count(c) == 1
  # It runs before `validate` (before JAX starts), so it names a bad batch field itself.
  c.cpu_devices, c.lista_train.batch = 0, -4
  with pytest.raises(runner.ConfigError, match=r"lista_train.batch: expected an integer >= 1, got -4"):
    runner.cpu_device_count(c)


def test_resume_keeps_the_device_count(tmp_path, monkeypatch):
  # A started job records its device count; auto (cpu_devices = 0) reuses it while the job is
  # unfinished, and a resume on another count is refused (its float trajectory would differ).
  from l2o_jax import distributed
  monkeypatch.setattr(distributed, "usable_cores", lambda: 2)
  c = quick.get_config()
  job = tmp_path / "lista_vm"
  job.mkdir()
  runner.check_job_devices(str(job), has_checkpoint=False)
  assert json.load(open(job / runner.DEVICES_FILE)) == {"devices": jax.device_count(),
                                                        "platform": jax.default_backend()}
  runner.check_job_devices(str(job), has_checkpoint=True)    # same count: resumes
  writers.write_json(str(job / runner.DEVICES_FILE), {"devices": 3, "platform": "cpu"})
  assert runner.cpu_device_count(c, str(tmp_path)) == 3       # auto follows the unfinished job
  with pytest.raises(runner.ConfigError, match=r"trained on 3 cpu device\(s\).*--config.cpu_devices=3"):
    runner.check_job_devices(str(job), has_checkpoint=True)
  writers.write_json(str(job / "results.json"), {})            # finished: auto is free again
  assert runner.cpu_device_count(c, str(tmp_path)) == 2


def test_multihost_fields():
  c = quick.get_config()
  assert runner.multihost_kwargs(c) == {}                      # JAX detects TPU / SLURM / MPI clusters
  c.coordinator_address, c.num_processes, c.process_id = "localhost:1234", 2, 1
  with pytest.raises(runner.ConfigError, match="multihost: the fields coordinator_address, "
                                               "num_processes, process_id are set but multihost is False"):
    runner.multihost_kwargs(c)
  c.multihost = True
  assert runner.multihost_kwargs(c) == {"coordinator_address": "localhost:1234", "num_processes": 2,
                                        "process_id": 1}
  c.process_id = 2
  with pytest.raises(runner.ConfigError, match=r"process_id: expected 0 .. num_processes - 1 = 1, got 2"):
    runner.multihost_kwargs(c)
  c.process_id = -3
  with pytest.raises(runner.ConfigError, match=r"process_id: expected an integer >= 0, got -3"):
    runner.multihost_kwargs(c)


def test_two_process_launch(tmp_path, run_processes):
  """`--config.multihost=True` with an explicit coordinator: two processes on this machine (one
  CPU device each, gloo collectives) train LISTA-VM data parallel; process 0 alone logs."""
  args = ["-m", "experiments.main", "--config=experiments/configs/quick.py",
          f"--workdir={tmp_path / 'run'}", "--config.studies=fig3", "--config.lista_train.steps=20",
          "--config.lista_train.batch=16", "--config.lista_train.matrices_per_batch=2",
          "--config.eval.num_tasks=16", "--config.eval.curve_tasks=16", "--config.cpu_devices=1",
          "--config.multihost=True", "--config.coordinator_address=localhost:{port}",
          "--config.num_processes=2"]
  results = run_processes([args + [f"--config.process_id={i}"] for i in (0, 1)])
  for code, _, err in results:
    assert code == 0, err[-8000:]
  (_, out0, _), (_, out1, _) = results
  assert "[lista_vm] training 20 steps x 16 instances, seeds [0], 2 devices" in out0
  assert "done in" in out0 and "[lista_vm]" not in out1
  assert (tmp_path / "run" / "lista_vm" / "results.json").exists()


def test_matmul_precision_scope_and_older_workdirs(tmp_path):
  c = quick.get_config()
  assert c.matmul_precision == "float32"
  before = jax.config.jax_default_matmul_precision
  with runner.matmul_precision(c):
    assert jax.config.jax_default_matmul_precision == "highest"   # full float32 on GPUs/TPUs too
    # ... and it reaches the compiled program: the dot asks for HIGHEST precision.
    assert "HIGHEST" in jax.jit(lambda a: a @ a).lower(jnp.ones((2, 2))).as_text().upper()
  assert jax.config.jax_default_matmul_precision == before         # scoped, not process-wide
  c.matmul_precision = "default"
  with runner.matmul_precision(c):
    assert jax.config.jax_default_matmul_precision is None
  # A workdir written before the field existed ran in float32: relaunching it with the default
  # config is allowed, with "default" it is refused.
  old = json.loads(quick.get_config().to_json())
  del old["matmul_precision"]
  writers.write_json(str(tmp_path / "config.json"), old)
  runner.check_workdir(quick.get_config(), str(tmp_path), log=lambda m: None)
  writers.write_json(str(tmp_path / "config.json"), old)
  with pytest.raises(runner.ConfigError, match=r"different config \(fields matmul_precision\)"):
    runner.check_workdir(c, str(tmp_path), log=lambda m: None)


def test_prompt_lengths_may_exceed_training_n():
  c = quick.get_config()
  assert max(runner._lengths(c)) > c.problem.n  # the quick preset goes beyond N = 10
  c.eval.prompt_lengths = "40,3,3"
  runner.validate(c)
  assert runner._lengths(c) == [3, 40]
  c.eval.prompt_lengths = ""
  assert runner._lengths(c) == list(range(1, 2 * c.problem.n + 1))  # default: 1..2N


def test_main_stops_on_missing_workdir_and_bad_config(child_env):
  env = child_env
  base = [sys.executable, "-m", "experiments.main", "--config=experiments/configs/quick.py"]
  missing = subprocess.run(base, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert missing.returncode != 0 and "workdir: missing" in missing.stderr
  bad = subprocess.run(base + ["--workdir=/nonexistent/never-created", "--config.tf.loss_on=both"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=120)
  assert bad.returncode != 0
  assert "tf.loss_on: unknown name 'both'; allowed: query, all" in bad.stderr
  assert not os.path.exists("/nonexistent/never-created")
  typo = subprocess.run(base + ["--workdir=/nonexistent/never-created", "--config.lista_train.stpes=20"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert typo.returncode != 0 and "Traceback" not in typo.stderr
  assert "config error: no such config field: 'stpes'" in typo.stderr and "--config.lista_train.stpes" in typo.stderr


# ---------------------------------------------------------------------------------------------
# SIGTERM: the worker (this file run as a script) trains with a StopOnSignal flag.


def toy_objective():
  def init(key):
    return {"w": 0.1 * jax.random.normal(key, (6,))}

  def sample(key):
    X = jax.random.normal(key, (16, 6))
    return X, X @ jnp.arange(6.0)

  return train.Objective(init, sample, lambda p, b: jnp.mean((b[1] - b[0] @ p["w"]) ** 2))


OBJ, OPT = toy_objective(), train.make_optimizer(1e-2)


def _worker(workdir):
  import time

  def on_chunk(step, state, metrics):
    print(f"STEP {step}", flush=True)
    if step == SPC:
      time.sleep(3.0)  # the parent signals now, mid-run

  ckpt = checkpoint.Checkpointer(workdir)
  with train.StopOnSignal() as stop:
    result = train.fit(OBJ, OPT, STEPS, steps_per_call=SPC, checkpointer=ckpt, checkpoint_every=1000,
                       eval_every=SPC, on_chunk=on_chunk, should_stop=stop, log_fn=None)
  print(f"INTERRUPTED {result.interrupted} {int(result.state.step[0])}", flush=True)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, child_env):
  proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(tmp_path)], cwd=REPO,
                          env=child_env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  line = proc.stdout.readline()
  assert line.startswith("STEP"), proc.stderr.read()[-2000:]
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-2000:]
  last = out.strip().splitlines()[-1].split()
  assert last[:2] == ["INTERRUPTED", "True"]
  stopped_at = int(last[2])
  assert 0 < stopped_at < STEPS and stopped_at % SPC == 0
  ckpt = checkpoint.Checkpointer(tmp_path)
  assert ckpt.steps() == [stopped_at]  # saved on the way out (checkpoint_every was 1000)
  resumed = train.fit(OBJ, OPT, STEPS, steps_per_call=SPC, checkpointer=ckpt, log_fn=None)
  reference = train.fit(OBJ, OPT, STEPS, steps_per_call=SPC, log_fn=None)
  assert resumed.resumed_from == stopped_at
  for a, b in zip(jax.tree_util.tree_leaves(resumed.state.params), jax.tree_util.tree_leaves(reference.state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------------------------
# A tiny real run through the runner (in-process: one small LISTA-VM job).


def tiny_config():
  c = quick.get_config()
  c.name = "tiny"
  c.studies = "fig3"
  c.problem.d, c.problem.n, c.problem.s = 6, 4, 2
  c.lista.num_layers = 2
  c.lista_train.steps, c.lista_train.batch, c.lista_train.matrices_per_batch = 20, 32, 4
  c.lista_train.steps_per_epoch = c.lista_train.steps_per_call = c.lista_train.checkpoint_every = 10
  c.eval.num_tasks, c.eval.curve_tasks, c.eval.prompt_lengths = 64, 32, "2,4,6"  # N = 4: 6 is beyond
  c.fig1b.support = 4
  return c


def test_a_stop_during_a_job_starts_no_other(tmp_path, monkeypatch):
  # A signal in a job's last chunk or final evaluation: that job finishes, the next never starts
  # (it would compile and train a whole chunk past a scheduler's grace period).
  c = tiny_config()
  c.fig3.methods = "lista_vm,lista_meta"
  assert len(runner.plan_jobs(c)) == 2

  class Flag(train.StopOnSignal):
    def __enter__(self):   # no real handlers in the test process
      return self

  flag, started = Flag(), []

  def run_job(c, job, workdir, *, mesh, stop, log):
    started.append(job.name)
    flag.signum = signal.SIGTERM            # arrives while this job evaluates
    return {"pred_error": {"mean": 1.0}}

  monkeypatch.setattr(runner, "run_job", run_job)
  monkeypatch.setattr(train, "StopOnSignal", lambda: flag)
  logs = []
  assert runner.run(c, str(tmp_path), log=logs.append) is None
  assert started == [runner.plan_jobs(c)[0].name]
  assert any("stopped by signal" in line for line in logs)


def test_relaunch_keeps_earlier_depth_references():
  # A relaunch without the layers study computes ISTA / FISTA at no extra depth; the earlier
  # launch's depth curve (ista_per_k) must survive the merge into results.json.
  old = {"none": {"ista": 1.0, "ista_per_k": {"1": 2.0, "2": 1.5}, "lam": 0.1}, "support4": {"ista": 3.0}}
  new = {"none": {"ista": 1.0, "ista_per_k": {}, "lasso": 0.5}}
  assert runner._merge_references(old, new) == {
      "none": {"ista": 1.0, "ista_per_k": {"1": 2.0, "2": 1.5}, "lam": 0.1, "lasso": 0.5},
      "support4": {"ista": 3.0}}
  # The same curve recomputed: read back from JSON its keys are strings, recomputed ints; merged
  # they must stay one key per n, or writing results.json fails (a relaunch crashed on it).
  old = {"none": {"ista_per_prompt_length": {"2": 1.0, "4": 0.5}}}
  merged = runner._merge_references(old, {"none": {"ista_per_prompt_length": {2: 1.0, 4: 0.5, 6: 0.25}}})
  assert merged == {"none": {"ista_per_prompt_length": {"2": 1.0, "4": 0.5, "6": 0.25}}}
  json.dumps(merged, sort_keys=True)   # as writers.write_json


def test_classical_table_uses_the_noise_level():
  from experiments import classical
  kw = dict(num_tasks=64, lams=(0.1,), d=6, n=4, s=2)
  clean, noisy = classical.classical_rows(**kw), classical.classical_rows(noise_std=1.0, **kw)
  assert clean[-1]["oracle"] < 1e-6 < noisy[-1]["oracle"]     # noiseless: the oracle is exact
  assert noisy[0]["lasso"] > clean[0]["lasso"]


def test_oracle_reference_left_out_beyond_its_size(monkeypatch):
  c = tiny_config()                                         # C(6, 2) = 15 supports per task
  assert runner.oracle_supports(c) == 15 and runner.oracle_supports(c, 4) == 6
  monkeypatch.setattr(runner, "ORACLE_MAX_SUPPORTS", 10)
  refs = runner.references(c, prompt_lengths=False)
  assert "oracle" not in refs and refs["oracle_skipped"] == "C(6, 2) = 15 supports per task, over 10"
  assert "oracle" in runner.references(c, support=4, prompt_lengths=False)   # C(4, 2) = 6
  with pytest.raises(ValueError, match=r"s: best_subset solves every S-subset .* C\(40, 8\) = 76,904,685"):
    import l2o_jax as L
    L.best_subset(np.ones((3, 40)), np.ones(3), 8)


def test_tiny_run_writes_every_output_and_report(tmp_path, monkeypatch):
  c = tiny_config()
  c.layers.ks, c.layers.steps = "1", 0    # for the second launch below (layers study, untrained)
  logs = []
  out = runner.run(c, str(tmp_path), log=logs.append)
  job = tmp_path / "lista_vm"
  assert json.load(open(tmp_path / "config.json")) == json.loads(c.to_json())
  metrics = writers.read_jsonl(str(job / "metrics.jsonl"))
  assert [m["step"] for m in metrics] == [10, 20] and [m["epoch"] for m in metrics] == [1.0, 2.0]
  events = [e for f in os.listdir(job) if f.startswith("events.out.tfevents")
            for e in writers.read_events(str(job / f))]
  assert events[0]["file_version"] == "brain.Event:2"
  logged = [e for e in events if "test/pred_error" in e["scalars"]]
  assert [e["step"] for e in logged] == [10, 20]
  np.testing.assert_allclose([e["scalars"]["test/pred_error"] for e in logged],
                             [m["test_pred_error"] for m in metrics], rtol=1e-6)
  res = json.load(open(job / "results.json"))
  assert res["steps"] == 20 and res["seeds"] == [0] and np.isfinite(res["pred_error"]["mean"])
  assert res["skipped_nonfinite_steps"] == 0 and res["resumed_from_step"] == 0
  # Killed after step 20's metrics line but before its checkpoint and results: the relaunch
  # resumes from step 10 and rewrites step 20's line instead of adding a second one.
  import shutil
  shutil.rmtree(job / "checkpoints" / "20")
  os.remove(job / "results.json")
  runner.run(c, str(tmp_path), log=logs.append)
  assert [m["step"] for m in writers.read_jsonl(str(job / "metrics.jsonl"))] == [10, 20]
  again = json.load(open(job / "results.json"))
  assert again["resumed_from_step"] == 10 and again["pred_error"] == res["pred_error"]   # exact resume
  assert sorted(res["per_prompt_length"]) == ["2", "4", "6"]  # LISTA-VM takes any n, also beyond N = 4
  assert "per_prompt_length_skipped" not in res
  assert out["jobs"]["lista_vm"]["pred_error"] == res["pred_error"]
  assert checkpoint.Checkpointer(job / "checkpoints").steps() == [10, 20]
  assert any("instances/s" in line for line in logs)
  # The final number is the evaluation of the trained parameters, reproducible from the checkpoint.
  from l2o_jax import lista
  objective, optimizer, *_ = runner.make_objective(c, runner.Job("lista_vm"))
  state, _ = checkpoint.Checkpointer(job / "checkpoints").restore_latest(
      train.init_states(objective, optimizer, [0]))
  task = runner.test_tasks(c, c.eval.num_tasks, salt=2)
  direct = lista.evaluate("lista_vm", jax.tree_util.tree_map(lambda x: x[0], state.params), task)
  assert res["pred_error"]["mean"] == pytest.approx(direct["pred_error"], rel=1e-6)
  lo, hi = (b["mean"] for b in res["pred_error_ci95"])          # the bootstrap interval of the mean
  assert lo < res["pred_error"]["mean"] < hi
  # experiments.spread: the same checkpoint on fresh test sets (salts 100, 101), with references.
  sp = spread.spread(str(tmp_path), sets=2, tails=True, log=lambda m: None)
  assert set(sp["methods"]) == {"lista_vm", "ISTA", "FISTA", "LASSO"}
  tail = sp["tails"]["lista_vm"]      # --tails: the same tasks' errors, binned by lambda_max(X^T X)
  assert list(sp["tails"]) == ["lista_vm"] and tail["tasks"] == 2 * c.eval.num_tasks
  assert tail["mean"] == pytest.approx(sp["methods"]["lista_vm"]["pooled_mean"], rel=1e-6)
  assert sum(b["tasks"] * b["reference_mean"] for b in tail["bins"]) / tail["tasks"] == pytest.approx(
      sp["methods"]["LASSO"]["pooled_mean"], rel=1e-5)
  fresh = runner.test_tasks(c, c.eval.num_tasks, salt=spread.SALT0 + 1)
  direct = lista.evaluate("lista_vm", jax.tree_util.tree_map(lambda x: x[0], state.params), fresh)
  assert sp["methods"]["lista_vm"]["set_means"][1] == pytest.approx(direct["pred_error"], rel=1e-5)
  assert sp["methods"]["lista_vm"]["set_means"][0] != pytest.approx(direct["pred_error"], rel=1e-3)
  assert "| lista_vm |" in spread.table(sp)
  d = np.subtract(sp["methods"]["lista_vm"]["set_means"], sp["methods"]["ISTA"]["set_means"])
  paired = spread.paired_table(sp).splitlines()      # header, separator, one row per reference
  assert len(paired) == 5 and (f"| lista_vm − ISTA | {d.min():.4g} / {np.median(d):.4g} / {d.max():.4g} "
                               f"| {int((d < 0).sum())} of 2 |") in paired
  means = sp["methods"]["lista_vm"]["set_means"]
  assert f"| lista_vm | 1 of 2 |" in spread.table(sp, below=min(means))
  # as spread.main writes it, here with `--with` a copy of itself posing as another run
  json.dump({**spread.merge(sp, {**sp, "workdir": "runs/other"}), "below": min(means)},
            open(tmp_path / "spread.json", "w"))
  with pytest.raises(ValueError, match=r"jobs: 'gpt2' is not a job of this run; its jobs are \['lista_vm'\]"):
    spread.spread(str(tmp_path), jobs=["gpt2"])
  # experiments.trained: the same checkpoint as a model for one's own JAX code.
  m = trained.load(str(tmp_path), "lista_vm")
  assert m.seed == 0 and m.job.name == "lista_vm" and m.config.lista.lam == c.lista.lam
  task = runner.test_tasks(c, c.eval.num_tasks, salt=2)
  params0 = jax.tree_util.tree_map(lambda x: x[0], state.params)
  np.testing.assert_allclose(jax.vmap(m.estimate)(task.X, task.y),
                             jax.vmap(lambda X, y: lista.apply("lista_vm", params0, X, y))(task.X, task.y), rtol=1e-6)
  pred = jax.vmap(m.predict)(task.X, task.y, task.x_query)
  assert float(jnp.mean((task.y_query - pred) ** 2)) == pytest.approx(res["pred_error"]["mean"], rel=1e-5)
  with pytest.raises(ValueError, match=r"seed: expected one of the run's training seeds \[0\], got 3"):
    trained.load(str(tmp_path), "lista_vm", seed=3)
  with pytest.raises(ValueError, match=r"jobs: 'small_tf' is not a job of this run"):
    trained.load(str(tmp_path), "small_tf")
  # Relaunch: finished jobs are not retrained; a changed config is refused, nothing overwritten.
  logs.clear()
  runner.run(c, str(tmp_path), log=logs.append)
  assert any("already done" in line for line in logs)
  c.lista.lam = 0.5
  with pytest.raises(runner.ConfigError, match=r"different config \(fields lista.lam\)"):
    runner.run(c, str(tmp_path), log=logs.append)
  # The report turns the run into figures and a table.
  figures, md = report.report([str(tmp_path)])
  assert {os.path.basename(f) for f in figures} == {"fig3.png", "per_layer.png", "prompt_length.png"}
  for f in figures:
    assert open(f, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  text = open(md).read()
  assert "Figure 3" in text and f"{metrics[-1]['test_pred_error']:.4g}" in text
  assert "| method | n=2 | n=4 | n=6 |" in text and "Columns n > N = 4 lie beyond" in text
  assert "Unfinished jobs" not in text
  assert "### Test-set spread" in text and "| lista_vm | 1 of 2 |" in text and "| lista_vm − LASSO |" in text
  assert "| lista_vm − lista_vm [other] | 0 / 0 / 0 | 0 of 2 |" in text and "(`--with`): `runs/other`." in text
  assert "### Where the mean error comes from" in text and "**lista_vm** (" in text
  # Another study launched into the same workdir: results.json and the report keep both, and
  # layers.steps = 0 scores the untrained ISTA-equivalent start (no checkpoint, no curve).
  c.lista.lam = 0.1
  monkeypatch.setattr(runner, "classical", lambda c, workdir, log: "| the classical table |")
  c.studies = "classical"
  runner.run(c, str(tmp_path), log=logs.append)
  c.studies = "layers"
  out = runner.run(c, str(tmp_path), log=logs.append)
  saved = json.load(open(tmp_path / "results.json"))
  assert saved["studies"] == ["fig3", "classical", "layers"]
  assert saved["classical_table"] == "| the classical table |"   # kept by a launch without it
  assert "1" in saved["references"]["none"]["ista_per_k"]   # the layers figure's ISTA / FISTA columns
  (name, layer_job), = [(k, v) for k, v in out["jobs"].items() if k != "lista_vm"]
  assert layer_job["steps"] == 0 and layer_job["curve"] == [] and np.isfinite(layer_job["pred_error"]["mean"])
  assert checkpoint.Checkpointer(tmp_path / name / "checkpoints").steps() == []
  sp = spread.spread(str(tmp_path), jobs=[name], sets=1, references=False, log=lambda m: None)
  assert list(sp["methods"]) == [name] and np.isfinite(sp["methods"][name]["set_means"][0])  # untrained start
  # config.json now names only "layers"; the first launch's job is still reachable (it was not).
  assert trained.load(str(tmp_path), "lista_vm").job.name == "lista_vm"
  assert "lista_vm" in spread.spread(str(tmp_path), sets=1, references=False, log=lambda m: None)["methods"]
  # A relaunch may change a job list (here layers.ks; fig1c.readouts adds a read-out the same way):
  # results.json, experiments.trained and the report keep the earlier launches' jobs too. Without
  # "job_lists" (a results.json from before it), the lists come from config.json and its studies.
  del saved["job_lists"]
  writers.write_json(str(tmp_path / "results.json"), saved)
  c.layers.ks = "2"
  runner.run(c, str(tmp_path), log=logs.append)
  saved = json.load(open(tmp_path / "results.json"))
  assert saved["job_lists"] == {"fig3.methods": runner._split(c.fig3.methods), "layers.ks": ["1", "2"]}
  assert trained.load_config(str(tmp_path)).layers.ks == "1,2" and len(saved["jobs"]) == 3
  assert trained.load(str(tmp_path), name).job.num_layers == 1
  depth = open(report.report([str(tmp_path)])[1]).read().split("Error vs depth K")[1]
  assert 0 < depth.index("| 1 |") < depth.index("| 2 |")     # both depths, sorted
  # A job that started but has no results (interrupted, stopped) is listed by the report.
  (tmp_path / "ghost" / "checkpoints").mkdir(parents=True)
  (tmp_path / "ghost" / "metrics.jsonl").write_text(json.dumps({"step": 30, "train_loss": 0.5}) + "\n")
  figures, md = report.report([str(tmp_path)])
  assert {"fig3.png", "layers.png"} <= {os.path.basename(f) for f in figures}
  text = open(md).read()
  assert "### Unfinished jobs" in text and "| ghost | 30 | 0.5 | - |" in text
  # experiments.trained reads the final step read-only: a step that fails to load is reported,
  # never moved aside (a relaunch skips the finished job, so it could not be rewritten).
  for root, _, files in os.walk(job / "checkpoints" / "20" / "default"):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
  with pytest.raises(Exception):
    trained.load(str(tmp_path), "lista_vm")
  assert sorted(os.listdir(job / "checkpoints")) == ["10", "20", "extra"]


def test_prompt_lengths_beyond_training_n_per_model():
  """Small TF (no positional encoding) and the references take every n, also beyond N; GPT-2 only
  n <= max_points - 1 = N (its learned position table); the skipped lengths are recorded."""
  c = tiny_config()  # N = 4, prompt lengths 2, 4, 6
  task, ppl_task = runner.test_tasks(c, c.eval.num_tasks, salt=2), runner.prompt_length_tasks(c)
  assert task.X.shape[1] == 4 and ppl_task.X.shape[1] == 6
  from l2o_jax import transformer
  tiny = {"small_tf": dict(num_layers=1, num_heads=1, readout="query"), "gpt2": dict(num_layers=1, width=8, num_heads=1)}
  rng = np.random.default_rng(0)
  for method, lengths, skipped in (("small_tf", [2, 4, 6], None), ("gpt2", [2, 4], [6])):
    job = runner.Job(method, readout="query" if method == "small_tf" else None)
    # Random weights of init_params' shapes (max_points = N + 1 for GPT-2) without compiling init.
    shapes = jax.eval_shape(lambda: transformer.init_params(method, jax.random.key(0), d=c.problem.d, n=c.problem.n,
                                                            **tiny[method]))
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(0.1 * rng.standard_normal(a.shape), a.dtype), shapes)
    out = runner.evaluate_job(c, job, params, task, full=True, ppl_task=ppl_task)
    assert sorted(out["per_prompt_length"]) == lengths and np.all(np.isfinite(list(out["per_prompt_length"].values())))
    assert out["pred_error"] == pytest.approx(transformer.evaluate(method, params, task)["pred_error"])  # N-demo set
    assert runner.prompt_length_note(c, job, params).get("per_prompt_length_skipped") == skipped
  assert out["per_prompt_length"][4] == pytest.approx(  # GPT-2: the first 4 demonstrations of the long set
      transformer.evaluate("gpt2", params, ppl_task._replace(X=ppl_task.X[:, :4], y=ppl_task.y[:, :4]))["pred_error"])
  refs = runner.reference_prompt_lengths(c)
  assert {k: sorted(v) for k, v in refs.items()} == {f"{m}_per_prompt_length": [2, 4, 6] for m in ("ista", "fista", "lasso")}



def test_small_tf_score_clip_reaches_training_and_evaluation():
  """tf.small_tf_score_clip (not the paper's model) caps the attention weights of the Small TF
  that the job trains and that evaluate_job scores; 0 (the default) is the paper's ReLU."""
  c = tiny_config()
  c.tf.small_tf_layers, c.tf.small_tf_heads = 2, 1
  job = runner.Job("small_tf", readout="query")
  task = runner.test_tasks(c, c.eval.num_tasks, salt=2)
  task = task._replace(X=3 * task.X, y=3 * task.y, x_query=3 * task.x_query)  # scores above the cap
  params = runner.make_objective(c, job)[0].init(jax.random.key(0))
  numbers = {}
  for clip in (0.0, 0.05):
    c.tf.small_tf_score_clip = clip
    runner.validate(c)
    loss = jax.jit(runner.make_objective(c, job)[0].loss)(params, task)
    numbers[clip] = float(loss), runner.evaluate_job(c, job, params, task, full=False)["pred_error"]
    # experiments.spread's per-task errors (its Transformer path) score the same model.
    assert spread._errors_fn(c, job, params)(task).mean() == pytest.approx(numbers[clip][1], rel=1e-5)
  for loss, pred_error in numbers.values():
    assert loss == pytest.approx(pred_error, rel=1e-5)   # trained and scored with the same model
  assert abs(numbers[0.05][0] - numbers[0.0][0]) > 1e-3 * numbers[0.0][0]   # the cap binds


def test_masked_prompt_lengths_equal_truncated_prompts():
  import l2o_jax as L
  task = L.sample_tasks(jax.random.key(5), 32, d=6, n=4, s=2)
  solver = lambda X, y: L.fista(X, y, 0.1, 5)
  masked = runner._per_prompt_length_masked(solver, task, [1, 3, 4])
  truncated = L.per_prompt_length(jax.jit(jax.vmap(solver)), task, [1, 3, 4])
  assert masked.keys() == truncated.keys()
  for n in masked:
    assert masked[n] == pytest.approx(truncated[n], rel=1e-5)


if __name__ == "__main__":
  _worker(sys.argv[1])


@pytest.mark.parametrize("argv, message", [
    (["--workdir=.", "--sets=0"], "--sets: expected an integer >= 1, got 0"),
    (["--workdir=.", "--tasks=-5"], "--tasks: expected an integer >= 1 (or 0 for the run's), got -5"),
    (["--workdir=.", "--tails", "--worst=0"], "--worst: expected an integer >= 1, got 0"),
    (["--workdir=/nonexistent"], "workdir: /nonexistent has no config.json (not a run directory)"),
    (["--workdir=.", "--with=/nonexistent"], "with: /nonexistent has no spread.json"),
])
def test_spread_cli_names_the_bad_argument(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    spread.main(argv)
  assert e.value.code == 2 and message in capsys.readouterr().err


def test_spread_paired_table_pairs_methods_on_the_same_test_sets():
  def m(means, trained, support):
    return {"set_means": means, "trained": trained, "support": support}
  out = {"methods": {"a": m([1.0, 2.0, 4.0], True, None), "b": m([1.0, 1.0], True, 10),
                     "c": m([2.0, 1.0, 3.0], True, None), "ISTA": m([1.5, 2.5, 3.5], False, None),
                     "ISTA (support 10)": m([2.0, 0.5], False, 10)}}
  rows = spread.paired_table(out).splitlines()[2:]
  # each pair of trained jobs once, never across test sets, never reference against reference
  assert rows == ["| a − c | -1 / 1 / 1 | 1 of 3 |", "| a − ISTA | -0.5 / -0.5 / 0.5 | 2 of 3 |",
                  "| b − ISTA (support 10) | -1 / -0.25 / 0.5 | 1 of 2 |", "| c − ISTA | -1.5 / -0.5 / 0.5 | 2 of 3 |"]
  old = {"methods": {k: {"set_means": r["set_means"]} for k, r in out["methods"].items()}}
  assert spread.paired_table(old) == ""        # a spread.json from before these fields


def test_spread_conditioning_matches_numpy():
  rng = np.random.default_rng(0)
  X = rng.normal(size=(7, 4, 6)).astype(np.float32)
  lam, smin = spread.conditioning(X)
  np.testing.assert_allclose(lam, [np.linalg.eigvalsh(x.T.astype(np.float64) @ x).max() for x in X], rtol=1e-6)
  np.testing.assert_allclose(smin, [np.linalg.svd(x.astype(np.float64), compute_uv=False)[3] for x in X], rtol=1e-6)
  # A support keeps only its columns: the restricted system of LISTA-VM-SS.
  lam_s, smin_s = spread.conditioning(X, support=3)
  np.testing.assert_allclose(lam_s, [np.linalg.eigvalsh(x[:, :3].T.astype(np.float64) @ x[:, :3]).max() for x in X],
                             rtol=1e-6)
  np.testing.assert_allclose(smin_s, [np.linalg.svd(x[:, :3].astype(np.float64), compute_uv=False)[2] for x in X],
                             rtol=1e-6)


def test_spread_tail_summary_against_a_plain_loop():
  rng = np.random.default_rng(1)
  n = 2000
  lam = rng.uniform(10, 80, n)
  errors = rng.exponential(0.1, n)
  errors[np.argsort(lam)[-3:]] = [50.0, 500.0, 5000.0]   # blow-ups at the largest lambda_max
  ref = rng.exponential(0.2, n)
  t = spread.tail_summary(errors, lam, np.ones(n), ref, worst=3)
  total = errors.sum()
  srt = np.sort(errors)[::-1]
  for k in (1, 10, 100, 20):      # 20 = 1% of the tasks
    assert t["top"][str(k)]["share"] == pytest.approx(srt[:k].sum() / total)
    assert t["top"][str(k)]["mean_without"] == pytest.approx(srt[k:].mean())
  assert [w["error"] for w in t["worst"]] == [5000.0, 500.0, 50.0]
  assert [b["tasks"] for b in t["bins"]] == [1000, 800, 180, 18, 2]
  lo = 0
  order = np.argsort(lam)
  for b in t["bins"]:
    idx = order[lo:lo + b["tasks"]]
    lo += b["tasks"]
    assert b["mean"] == pytest.approx(errors[idx].mean())
    assert b["share"] == pytest.approx(errors[idx].sum() / total)
    assert b["reference_mean"] == pytest.approx(ref[idx].mean())
    assert b["lam_max"] == pytest.approx([lam[idx].min(), lam[idx].max()])
  assert t["bins"][-1]["share"] > 0.9 and t["mean"] == pytest.approx(errors.mean())
  assert "| 0.999–1 |" in spread.tails_table({"tails": {"m": t}})
  # A NaN task counts as +inf, and shapes must agree.
  inf = spread.tail_summary([1.0, np.nan], [1.0, 2.0], [1.0, 1.0])
  assert inf["worst"][0]["error"] == np.inf and np.isnan(inf["top"]["1"]["share"])
  with pytest.raises(ValueError, match="expected equal 1-d shapes"):
    spread.tail_summary([1.0, 2.0], [1.0], [1.0, 1.0])


def test_per_method_learning_rates_and_clip_norms():
  """lista_train.method_learning_rates / method_clip_norms override learning_rate / clip_norm for
  the methods they name (CLIP 0: no clipping)."""
  c = tiny_config()
  c.lista_train.learning_rate, c.lista_train.clip_norm = 1e-3, 1.0
  c.lista_train.method_learning_rates = "lista_vm_ss=1e-2"
  c.lista_train.method_clip_norms = "lista_vm_ss=10,lista_vm=0"
  runner.validate(c)
  assert runner.lista_lr_and_clip(c, runner.Job("lista_vm_ss", support=3)) == (1e-2, 10.0)
  assert runner.lista_lr_and_clip(c, runner.Job("lista_vm")) == (1e-3, None)
  assert runner.lista_lr_and_clip(c, runner.Job("lista_meta")) == (1e-3, 1.0)


# ----------------------------------------------------------------------------------------------
# Paths a mutation audit (twenty-second session) found untested.


def test_plan_jobs_covers_every_study_of_the_quick_preset():
  c = quick.get_config()   # all studies
  jobs = runner.plan_jobs(c)
  names = [j.name for j in jobs]
  assert len(names) == len(set(names))
  for name in ("lista_vm_ss-support10", "small_tf-support10-query", "small_tf-linear", "small_tf-query_dagger",
               "lista_vm-K16", "lista_meta", "alista"):
    assert name in names, (name, names)
  assert {j.support for j in jobs if "support" in j.name} == {c.fig1b.support}


@pytest.mark.parametrize("overrides, message", [
    ({"tf.gpt2_width": 30}, r"tf.gpt2_width: expected a multiple of tf.gpt2_heads=4, got 30"),
    ({"layers.ks": ""}, r"layers.ks: expected at least one depth"),
])
def test_config_validation_more_fields(overrides, message):
  c = quick.get_config()
  for field, value in overrides.items():
    section, _, name = field.rpartition(".")
    c[section][name] = value
  with pytest.raises(runner.ConfigError, match=message):
    runner.validate(c)
  c = quick.get_config()
  c.problem.d = c.problem.s = 3
  c.fig1b.support = 3
  runner.validate(c)   # s = d is allowed (every coordinate may be nonzero)


def test_job_device_records(tmp_path):
  # A job without a checkpoint (killed before its first save) starts afresh on any device count
  # and records the new one; the newest unfinished job's count is the one a relaunch reuses.
  job = tmp_path / "w" / "a"
  os.makedirs(job)
  other = jax.device_count() + 2
  writers.write_json(str(job / runner.DEVICES_FILE), {"devices": other, "platform": "cpu"})
  runner.check_job_devices(str(job), has_checkpoint=False)
  assert json.load(open(job / runner.DEVICES_FILE))["devices"] == jax.device_count()
  for name, devices, mtime in (("old", 5, 1_000), ("new", 3, 2_000)):
    os.makedirs(tmp_path / "v" / name)
    path = tmp_path / "v" / name / runner.DEVICES_FILE
    writers.write_json(str(path), {"devices": devices, "platform": "cpu"})
    os.utime(path, (mtime, mtime))
  assert runner.unfinished_job_devices(str(tmp_path / "v")) == 3


def test_references_index_depths_and_support():
  # Depth K entries come from the trajectory at K (not its end); the prompt-length references
  # use the support prior's test set; a newer launch's reference values win in the merge.
  c = tiny_config()
  c.eval.num_tasks, c.eval.iters = 16, 2
  r = runner.references(c, ks=[1, 3], prompt_lengths=False)
  assert r["ista_per_k"][1] == pytest.approx(r["ista_per_layer"][0])
  assert r["ista_per_layer"][1] == pytest.approx(r["ista"]) and r["ista_per_k"][3] != pytest.approx(r["ista"])
  assert r["fista_per_k"][1] != pytest.approx(r["fista_per_k"][3])
  import l2o_jax as L
  task = runner.test_tasks(c, c.eval.num_tasks, salt=2)       # the references' test set
  beta = jax.vmap(lambda X, y: L.ista(X, y, c.eval.lam, 2))(task.X, task.y)
  assert r["ista_median"] == pytest.approx(float(L.median_error(L.prediction_errors(task.y_query, task.x_query, beta))),
                                           rel=1e-5)   # at K = eval.iters, not at the deepest K
  plain, prior = runner.reference_prompt_lengths(c), runner.reference_prompt_lengths(c, support=4)
  assert prior["lasso_per_prompt_length"] != plain["lasso_per_prompt_length"]
  lasso = runner.reference_solvers(c)["lasso"]
  assert prior["lasso_per_prompt_length"] == runner._per_prompt_length_masked(
      lasso, runner.prompt_length_tasks(c, support=4), [2, 4, 6])
  merged = runner._merge_references({"none": {"ista": 1.0, "ista_per_k": {"1": 2.0}}},
                                    {"none": {"ista": 0.9, "ista_per_k": {1: 1.9}}})
  assert merged == {"none": {"ista": 0.9, "ista_per_k": {"1": 1.9}}}


def test_evaluate_job_fixed_x_and_support_paths():
  from l2o_jax import lista
  c = tiny_config()
  c.eval.num_tasks = 16
  task = runner.test_tasks(c, 16, salt=2)
  fixed_task = runner.test_tasks(c, 16, X=runner.fixed_X(c), salt=3)
  job = runner.Job("lista")
  p = runner.make_objective(c, job)[0].init(jax.random.key(0))
  out = runner.evaluate_job(c, job, p, task, full=True, fixed_task=fixed_task)
  assert out["pred_error_fixed_x"] == pytest.approx(lista.evaluate("lista", p, fixed_task)["pred_error"])
  assert out["pred_error_fixed_x"] != pytest.approx(out["pred_error"])
  # LISTA-VM trained on support-prior data applies no mask itself (only LISTA-VM-SS does).
  job = runner.Job("lista_vm", support=4)
  p = runner.make_objective(c, job)[0].init(jax.random.key(0))
  out = runner.evaluate_job(c, job, p, task, full=False)
  assert out["pred_error"] == pytest.approx(lista.evaluate("lista_vm", p, task)["pred_error"])


def test_spread_merge_adds_another_runs_jobs_on_the_same_test_sets():
  def m(means, trained, support=None, size=4):
    return {**spread.summarise([np.full(size, v) for v in means]), "trained": trained, "support": support}
  sig = {"eval_seed": 0, "d": 20, "n": 10, "s": 3, "noise_std": 0.0}
  here = {"workdir": "runs/a", "salts": [100, 101], "test_sets": sig,
          "methods": {"small_tf-linear": m([2.0, 3.0], True), "ISTA": m([2.5, 2.5], False)}}
  there = {"workdir": "runs/b/", "salts": [100, 101], "test_sets": dict(sig),
           "methods": {"small_tf-query": m([1.0, 4.0], True), "ISTA": m([2.5, 2.5 * (1 + 1e-6)], False),
                       "old [runs/c]": {**m([0.0, 0.0], True), "workdir": "runs/c"}}}
  out = spread.merge(here, there)
  assert list(out["methods"]) == ["small_tf-linear", "ISTA", "small_tf-query [b]"]   # a third run's job left out
  assert out["with"] == ["runs/b/"] and out["methods"]["small_tf-query [b]"]["workdir"] == "runs/b/"
  assert "small_tf-query" not in here["methods"]                                      # `here` untouched
  rows = spread.paired_table(out).splitlines()[2:]
  assert "| small_tf-linear − small_tf-query [b] | -1 / 0 / 1 | 1 of 2 |" in rows
  assert "| small_tf-query [b] − ISTA | -1.5 / 0 / 1.5 | 1 of 2 |" in rows
  assert "| small_tf-query [b] |" in spread.table(out)
  bad = [({**there, "salts": [100, 102]}, "salts"),
         ({**there, "test_sets": {**sig, "eval_seed": 1}}, "test_sets"),
         ({**there, "methods": {"q": m([1.0, 1.0], True, size=8)}}, "another size"),
         ({**there, "methods": {"ISTA": m([2.5, 2.6], False)}}, "not the same test sets")]
  for base, other, message in [(here, o, msg) for o, msg in bad] + [(out, there, "already in the tables")]:
    with pytest.raises(ValueError, match=message):
      spread.merge(base, other)
