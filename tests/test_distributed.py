"""Data-parallel training on 4 (forced host) devices == 1 device; seeds trained together by vmap
== seeds trained separately.

The 4-device run must split the CPU before JAX starts (`distributed.set_cpu_devices`, as
experiments.main does), so it runs in a subprocess: this file executed as a script
(`python tests/test_distributed.py OUT.npz`) is that worker. The multi-process run
(`jax.distributed`, two processes of two CPU devices each, gloo collectives) uses it too:
`python tests/test_distributed.py OUT.npz PROCESS_ID PORT CKPT_DIR`.
"""
import json
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2o_jax import distributed, lista, tasks, train

STEPS, BATCH, SEEDS = 20, 16, (0, 1, 2)


def toy_objective():
  """Linear prediction of y_query from x_query on fresh sparse-recovery tasks."""
  def init(key):
    return {"w": 0.1 * jax.random.normal(key, (6,)), "b": jnp.zeros(())}

  def sample(key):
    return tasks.sample_tasks(key, BATCH, d=6, n=4, s=2)

  def loss(params, task):
    pred = task.x_query @ params["w"] + params["b"]
    return jnp.mean((task.y_query - pred) ** 2)

  return train.Objective(init, sample, loss)


OBJ = toy_objective()
OPT = train.make_optimizer(1e-2)


def lista_objective():
  """A real model too: LISTA-VM's layer loop is a lax.scan from a zero carry, code that
  shard_map's varying-axes type check would reject. (A function: building it starts JAX, which
  the worker must not do before splitting the CPU.)"""
  return lista.make_objective("lista_vm", protocol="meta", d=6, n=4, s=2, num_layers=3, batch=8)


def _leaves(state):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves((state.params, state.opt_state))]


def _global(x):
  """The whole of a (possibly multi-process) sharded array on the host."""
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(x, tiled=True)


def _worker(out_path):
  assert distributed.set_cpu_devices(4) == 4   # before any JAX computation
  mesh = distributed.data_mesh()
  objective = distributed.data_parallel(OBJ, mesh)
  info = _sharded_batch_info(objective)
  result = train.fit(objective, OPT, STEPS, seeds=SEEDS, steps_per_call=STEPS, log_fn=None,
                     place=lambda s: distributed.replicate(s, mesh))
  state = result.state
  info["replicated"] = _replicated(state)
  lista_state = train.fit(distributed.data_parallel(lista_objective(), mesh), OPT, 5, steps_per_call=5, log_fn=None,
                          place=lambda s: distributed.replicate(s, mesh)).state
  np.savez(out_path, *_leaves(state), *_leaves(lista_state), result.losses)   # losses: the reported per-step means
  info["gpu_path_rel_diff"] = _gpu_path_rel_diff(mesh)
  # A batch of 6 does not split over 4 devices: refused when wrapped, before any compile.
  try:
    distributed.data_parallel(OBJ._replace(sample=lambda key: tasks.sample_tasks(key, 6, d=6, n=4, s=2)), mesh)
    info["bad_batch"] = None
  except ValueError as e:
    info["bad_batch"] = str(e)
  print(json.dumps(info))


def _gpu_path_rel_diff(mesh) -> dict:
  """Per model, the largest relative difference between the data-parallel loss and gradients
  traced for the CPU and traced as for a GPU (jax.default_backend patched): plain matmuls instead
  of `ops.dense` / `ops.bmm`'s custom VJPs, one causal block. Runs the GPU code path here, where
  CI has no GPU; inside shard_map it is the replicated-weight x per-device-data typing that must
  still sum the weight gradients over devices."""
  from l2o_jax.transformer import make_objective
  out = {}
  for model, kw in (("small_tf", dict(num_layers=2)), ("gpt2", dict(num_layers=2, width=32, num_heads=4))):
    grads = []
    for backend in ("cpu", "gpu"):
      orig = jax.default_backend
      jax.default_backend = lambda backend=backend: backend
      try:
        obj = make_objective(model, d=5, n=6, batch=8, **kw)
        params, batch = obj.init(jax.random.key(0)), obj.sample(jax.random.key(1))
        grads.append(jax.jit(lambda p, b, obj=obj: distributed.mean_value_and_grad(obj.loss, p, b, mesh=mesh))(params, batch))
      finally:
        jax.default_backend = orig
    out[model] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / (np.max(np.abs(np.asarray(a))) + 1e-30))
                     for a, b in zip(*(jax.tree_util.tree_leaves(g) for g in grads), strict=True))
  return out


def _sharded_batch_info(objective):
  """How `data_parallel(OBJ)`'s sampled batch is laid out, and whether it equals OBJ's own."""
  batch = jax.jit(objective.sample)(jax.random.key(3))
  plain = jax.jit(OBJ.sample)(jax.random.key(3))
  return {"devices": jax.device_count(), "shards": len(batch.X.addressable_shards),
          "spec": str(batch.X.sharding.spec),
          "same_data": all(bool((_global(a) == np.asarray(b)).all()) for a, b in zip(batch, plain))}


def _replicated(state):
  return all(x.sharding.is_fully_replicated and len(x.sharding.device_set) == jax.device_count()
             for x in jax.tree_util.tree_leaves(state.params))


def _multiprocess_worker(out_path, process_id, port, ckpt_dir):
  """One of two processes with two CPU devices each: the toy training of `_worker` over a mesh
  that spans both processes, stopped at STEPS / 2 by one process's stop flag with a checkpoint
  and resumed to STEPS; then the last checkpoint is damaged and restored from."""
  from jax.experimental import multihost_utils
  from l2o_jax.checkpoint import Checkpointer
  distributed.set_cpu_devices(2)
  # A short shutdown timeout: a process that fails exits soon instead of waiting 5 minutes for
  # its peer at shutdown, and the test's run_processes then stops the peer.
  distributed.initialize(True, coordinator_address=f"localhost:{port}", num_processes=2,
                         process_id=process_id, shutdown_timeout_seconds=10)
  assert jax.process_count() == 2 and len(jax.local_devices()) == 2
  mesh = distributed.data_mesh()
  objective = distributed.data_parallel(OBJ, mesh)
  info = _sharded_batch_info(objective)
  place = lambda s: distributed.replicate(s, mesh)
  ckpt = Checkpointer(ckpt_dir)
  # Only process 1 asks to stop (a signal that reached one host before the chunk boundary):
  # both must stop there together, or one would wait in the save and the other in the next
  # chunk's all-reduce forever.
  half = train.fit(objective, OPT, STEPS, seeds=SEEDS, steps_per_call=STEPS // 2, log_fn=None,
                   checkpointer=ckpt, place=place, should_stop=lambda: jax.process_index() == 1)
  info["half_stop"] = [int(np.asarray(half.state.step).flat[0]), half.interrupted]
  resumed = train.fit(objective, OPT, STEPS, seeds=SEEDS, steps_per_call=STEPS // 2, log_fn=None,
                      checkpointer=ckpt, place=place)
  info.update(replicated=_replicated(resumed.state), half_start=half.resumed_from,
              resumed_start=resumed.resumed_from, steps=ckpt.steps())
  # A damaged latest step: every process fails to read it, process 0 moves it aside, and all
  # fall back to the previous one.
  if jax.process_index() == 0:
    for root, _, files in os.walk(os.path.join(ckpt_dir, str(STEPS), "default")):
      for f in files:
        with open(os.path.join(root, f), "wb") as fh:
          fh.write(b"garbage")
  multihost_utils.sync_global_devices("damaged")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    info["fallback"] = ckpt.restore_latest(resumed.state)[1]
  info["moved"] = sum(p.startswith("corrupt-") for p in os.listdir(ckpt_dir))
  ckpt.close()   # (every process opens and closes a Checkpointer: orbax synchronises them)
  if jax.process_index() == 0:
    np.savez(out_path, *_leaves(resumed.state))
    print(json.dumps(info))


@pytest.fixture(scope="module")
def one_device():
  """Three seeds trained together (vmap) on one device."""
  return train.fit(OBJ, OPT, STEPS, seeds=SEEDS, steps_per_call=STEPS, log_fn=None)


def test_four_devices_match_one_device(tmp_path, one_device, child_env):
  out = tmp_path / "four.npz"
  env = child_env
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(out)], env=env, cwd=repo,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  info = json.loads(proc.stdout.strip().splitlines()[-1])
  assert info["devices"] == 4 and info["shards"] == 4
  assert "data" in info["spec"]                    # the batch really is split over devices
  assert info["same_data"]                         # and holds the same numbers as on one device
  assert info["replicated"]                        # parameters replicated on all 4
  assert "multiple of the number of devices (4), got leading size 6" in info["bad_batch"]
  # The GPU code path (plain matmuls) gives the same data-parallel loss and gradients.
  assert set(info["gpu_path_rel_diff"]) == {"small_tf", "gpt2"}
  assert all(v < 1e-5 for v in info["gpu_path_rel_diff"].values()), info["gpu_path_rel_diff"]
  four = np.load(out)
  one = _leaves(one_device.state)
  one += _leaves(train.fit(lista_objective(), OPT, 5, steps_per_call=5, log_fn=None).state)
  one.append(one_device.losses)   # the loss each step reports is the full batch's mean, not a sum of shards
  assert len(four.files) == len(one)
  for i, ref in enumerate(one):
    np.testing.assert_allclose(four[f"arr_{i}"], ref, rtol=1e-5, atol=1e-6)


def test_two_processes_match_one_device(tmp_path, one_device, run_processes):
  """Multi-host data parallelism (`initialize(multihost=True)`) on one machine: two processes,
  gloo collectives. Same results as one device through a checkpointed stop and resume, and a
  damaged checkpoint is moved aside once. (experiments.main across processes: test_launcher.)"""
  out = tmp_path / "two.npz"
  results = run_processes([[os.path.abspath(__file__), str(out), str(i), "{port}", str(tmp_path / "ckpt")]
                           for i in (0, 1)])
  for code, _, err in results:
    assert code == 0, err[-8000:]
  info = json.loads([line for line in results[0][1].splitlines() if line.startswith("{")][-1])
  assert info == {"devices": 4, "shards": 2,                 # 2 of the 4 shards live in each process
                  "spec": "P('data',)", "same_data": True, "replicated": True,
                  "half_start": 0, "half_stop": [STEPS // 2, True],
                  "resumed_start": STEPS // 2, "steps": [STEPS // 2, STEPS],
                  "fallback": STEPS // 2, "moved": 1}
  two = np.load(out)
  one = _leaves(one_device.state)
  assert len(two.files) == len(one)
  for i, ref in enumerate(one):
    np.testing.assert_allclose(two[f"arr_{i}"], ref, rtol=1e-5, atol=1e-6)


def test_seeds_vmap_equals_separate_runs(one_device):
  seeds, together = SEEDS, one_device
  assert together.losses.shape == (3, STEPS)
  chunk = train.make_train_chunk(OBJ, OPT, STEPS)  # the plain, un-vmapped loop
  for i, seed in enumerate(seeds):
    state, metrics = chunk(train.init_state(OBJ, OPT, seed))
    np.testing.assert_allclose(together.losses[i], np.asarray(metrics["loss"]), rtol=1e-5, atol=1e-7)
    for a, b in zip(_leaves(state), [x[i] for x in _leaves(together.state)], strict=True):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7)
  # Different seeds really are different runs.
  assert not np.allclose(together.losses[0], together.losses[1])


def test_mean_value_and_grad_matches_value_and_grad():
  mesh = distributed.data_mesh(jax.devices()[:1])
  params = OBJ.init(jax.random.key(0))
  batch = OBJ.sample(jax.random.key(1))
  loss, grads = jax.jit(lambda p, b: distributed.mean_value_and_grad(OBJ.loss, p, b, mesh=mesh))(params, batch)
  ref_loss, ref_grads = jax.value_and_grad(OBJ.loss)(params, batch)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_micro_benchmark_flat_all_reduce_matches_the_default():
  # benchmarks.micro --only=allreduce times the former flat-buffer all-reduce against the
  # default: both must compute the same loss and gradients.
  from benchmarks import micro
  mesh = distributed.data_mesh(jax.devices()[:1])
  params = OBJ.init(jax.random.key(0))
  batch = OBJ.sample(jax.random.key(1))
  both = jax.jit(lambda p, b: [f(OBJ.loss, p, b, mesh=mesh) for f in
                               (distributed.mean_value_and_grad, micro._flat_mean_value_and_grad)])
  (loss, grads), (flat_loss, flat_grads) = both(params, batch)
  np.testing.assert_allclose(flat_loss, loss, rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(flat_grads), jax.tree_util.tree_leaves(grads), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)


def test_micro_benchmark_micro_batches_match_the_default():
  # benchmarks.micro --only=microbatch times gradient accumulation over micro-batches against the
  # default (one backward pass per shard): the mean loss and gradients must be the same.
  from benchmarks import micro
  mesh = distributed.data_mesh(jax.devices()[:1])
  params = OBJ.init(jax.random.key(0))
  batch = OBJ.sample(jax.random.key(1))
  variants = (distributed.mean_value_and_grad, micro._microbatch_mean_value_and_grad(2, True),
              micro._microbatch_mean_value_and_grad(4, False))
  (loss, grads), *others = jax.jit(lambda p, b: [f(OBJ.loss, p, b, mesh=mesh) for f in variants])(params, batch)
  for other_loss, other_grads in others:
    np.testing.assert_allclose(other_loss, loss, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(other_grads), jax.tree_util.tree_leaves(grads), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_batch_specs_split_instance_leaves_only():
  # Instance leaves (leading size B = 16) are split, scalars replicated. A leaf shared by all
  # instances (here a (4, 3) matrix, whose leading size also divides by the device count) would
  # be split as if it held instances and silently change the loss: refused.
  P = jax.sharding.PartitionSpec
  task = OBJ.sample(jax.random.key(1))
  task_specs, scalar = distributed._batch_specs((task, jnp.ones(())), 2)
  assert all(spec == P("data") for spec in task_specs) and scalar == P()
  with pytest.raises(ValueError, match=r"same instance count .*leading sizes \[4, 16\]"):
    distributed._batch_specs({"A": jnp.ones((4, 3)), "task": task}, 2)
  with pytest.raises(ValueError, match=r"multiple of the number of devices \(3\), got leading size 16"):
    distributed._batch_specs(task, 3)


def test_auto_cpu_devices_divides_the_batches(monkeypatch):
  monkeypatch.setattr(distributed, "usable_cores", lambda: 6)
  assert distributed.auto_cpu_devices() == 6
  assert distributed.auto_cpu_devices([64]) == 4
  assert distributed.auto_cpu_devices([128, 500]) == 4
  assert distributed.auto_cpu_devices([32, 256]) == 2     # the smallest batch sets the floor
  assert distributed.auto_cpu_devices([63]) == 3
  assert distributed.auto_cpu_devices([7]) == 1
  assert distributed.auto_cpu_devices([96]) == 6
  assert distributed.auto_cpu_devices([32]) == 2          # at least 16 instances per device
  assert distributed.auto_cpu_devices([32], min_per_device=8) == 4
  monkeypatch.setattr(distributed, "usable_cores", lambda: 1)
  assert distributed.auto_cpu_devices([64]) == 1


def test_set_cpu_devices_after_start():
  have = len(jax.devices("cpu"))            # this process's backends are already running
  assert distributed.set_cpu_devices(have) == have
  with pytest.raises(ValueError, match=f"already initialised with {have} CPU device"):
    distributed.set_cpu_devices(have + 1)
  for bad in (0, -2, 1.5, True):
    with pytest.raises(ValueError, match="n: expected a positive integer"):
      distributed.set_cpu_devices(bad)


def test_mesh_helpers_validate():
  mesh = distributed.data_mesh()
  assert mesh.axis_names == ("data",)
  distributed.check_batch(8, mesh)
  with pytest.raises(ValueError, match="devices: expected at least one device"):
    distributed.data_mesh([])
  distributed.initialize(False)  # a no-op without the multihost flag
  assert distributed.data_parallel(OBJ, mesh) is OBJ or mesh.devices.size > 1


if __name__ == "__main__":
  if len(sys.argv) == 5:
    _multiprocess_worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
  else:
    _worker(sys.argv[1])
