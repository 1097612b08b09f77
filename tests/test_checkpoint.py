"""Checkpoints: SIGKILL + relaunch == uninterrupted (bitwise), corrupt-latest fallback, leftover
partial saves, non-finite stop keeping the last good checkpoint.

The training runs use a tiny least-squares objective on `sample_tasks` data (one fast compile);
the machinery under test (train.fit + checkpoint.Checkpointer) is model-agnostic. Run as a
script (`python tests/test_checkpoint.py WORKDIR [KILL_AT]`) this file is the worker that the
SIGKILL test launches in a subprocess.
"""
import gc
import logging
import os
import signal
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from l2o_jax import checkpoint, train

STEPS, SPC, EVERY = 40, 5, 10


def toy_objective():
  """Least squares on fresh Gaussian data drawn from the step's key (a fast compile)."""
  def init(key):
    return {"w": 0.1 * jax.random.normal(key, (6,)), "b": jnp.zeros(())}

  def sample(key):
    X = jax.random.normal(key, (16, 6))
    return X, X @ jnp.arange(6.0) + 1.0

  def loss(params, batch):
    X, y = batch
    return jnp.mean((y - X @ params["w"] - params["b"]) ** 2)

  return train.Objective(init, sample, loss)


OPT = train.make_optimizer(1e-2)
OBJ = toy_objective()  # one object, so every fit below reuses one compiled chunk


def run_fit(workdir=None, num_steps=STEPS, on_chunk=None, **kw):
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=3) if workdir else None
  try:
    return train.fit(OBJ, OPT, num_steps, seeds=(0,), steps_per_call=SPC, checkpointer=ckpt,
                     checkpoint_every=EVERY, eval_every=SPC, on_chunk=on_chunk, log_fn=None, **kw)
  finally:
    if ckpt is not None:
      ckpt.close()


def _leaves(state):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(state.params)] + [
      np.asarray(x) for x in jax.tree_util.tree_leaves(state.opt_state)]


def assert_bitwise(a, b):
  for x, y in zip(_leaves(a), _leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference():
  return run_fit().state


def _worker(workdir, kill_at):
  def on_chunk(step, state, metrics):
    if step == kill_at:  # after the chunk, before its checkpoint: the hardest place to die
      os.kill(os.getpid(), signal.SIGKILL)

  state = run_fit(os.path.join(workdir, "ckpt"), on_chunk=on_chunk).state
  np.savez(os.path.join(workdir, "final.npz"), *_leaves(state))


def test_sigkill_then_relaunch_is_bitwise_identical(tmp_path, reference, child_env):
  # The relaunch reuses the killed run's compiled chunk from the persistent compilation cache.
  env = dict(child_env, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"))
  cmd = [sys.executable, os.path.abspath(__file__), str(tmp_path)]
  killed = subprocess.run(cmd + ["30"], env=env, capture_output=True, text=True, timeout=300)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  assert checkpoint.Checkpointer(tmp_path / "ckpt").latest_step() == 20  # step 30 was never saved
  resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  final = np.load(tmp_path / "final.npz")
  ref = _leaves(reference)
  assert len(final.files) == len(ref)
  for i, r in enumerate(ref):
    np.testing.assert_array_equal(final[f"arr_{i}"], r)


def test_resume_in_process_and_chunk_grid(tmp_path, reference):
  first = run_fit(tmp_path, num_steps=25)  # stops off the checkpoint grid: 25 is saved as the end
  assert checkpoint.Checkpointer(tmp_path).steps() == [10, 20, 25]
  second = run_fit(tmp_path)
  assert second.resumed_from == 25 and first.resumed_from == 0
  assert_bitwise(second.state, reference)
  assert train.chunk_boundaries(25, 40, 5, 10) == [30, 35, 40]
  assert train.chunk_boundaries(0, 12, 5, 4) == [4, 5, 8, 10, 12]


def test_corrupt_latest_falls_back_to_previous(tmp_path, reference):
  run_fit(tmp_path, num_steps=30)
  ckpt = checkpoint.Checkpointer(tmp_path)
  assert ckpt.steps() == [10, 20, 30]
  # Damage every data file of the latest step (as a disk error or a truncated copy would).
  for root, _, files in os.walk(tmp_path / "30" / "default"):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")
  like = train.init_states(OBJ, OPT, (0,))
  with pytest.warns(RuntimeWarning, match="step 30 .* could not be restored .*; left in place; using step 20"):
    state, step = ckpt.restore_latest(like, quarantine=False)   # read-only use: nothing moves
  assert step == 20 and ckpt.steps() == [10, 20, 30]
  with pytest.warns(RuntimeWarning, match="step 30 .* could not be restored"):
    state, step = ckpt.restore_latest(like)
  assert step == 20 and int(state.step[0]) == 20
  moved = [p for p in os.listdir(tmp_path) if p.startswith("corrupt-30-")]
  assert len(moved) == 1 and ckpt.steps() == [10, 20]  # kept aside, not deleted
  ckpt.close()
  with warnings.catch_warnings():
    warnings.simplefilter("error", RuntimeWarning)  # nothing left to warn about
    final = run_fit(tmp_path)
  assert final.resumed_from == 20
  assert_bitwise(final.state, reference)


def test_no_restorable_step_raises_and_moves_nothing(tmp_path):
  # When every step fails (as an I/O error or exhausted file handles would make them), that is
  # not corruption: moving them all aside used to restart the run from step 0.
  run_fit(tmp_path, num_steps=20)
  ckpt = checkpoint.Checkpointer(tmp_path)
  for step in ("10", "20"):
    for root, _, files in os.walk(tmp_path / step / "default"):
      for f in files:
        with open(os.path.join(root, f), "wb") as fh:
          fh.write(b"garbage")
  try:
    with pytest.raises(checkpoint.CheckpointRestoreError, match=r"none was moved aside.*step 20: .*step 10: "):
      ckpt.restore_latest(train.init_states(OBJ, OPT, (0,)))
    assert ckpt.steps() == [10, 20]
    assert not [p for p in os.listdir(tmp_path) if p.startswith("corrupt-")]
  finally:
    ckpt.close()


def test_missing_data_file_falls_back_without_stray_tracebacks(tmp_path):
  # A lost data file fails one of orbax's concurrent array reads and abandons the others; their
  # coroutines used to print "Exception ignored in <coroutine ...>" tracebacks whenever they were
  # garbage-collected (often at exit), around the one warning that matters.
  run_fit(tmp_path, num_steps=20)
  ckpt = checkpoint.Checkpointer(tmp_path)
  data = [os.path.join(root, f) for root, _, files in os.walk(tmp_path / "20" / "default")
          for f in files if os.sep + "d" + os.sep in os.path.join(root, f)]
  assert data, "expected ocdbt data files under 20/default/*/d/"
  for f in data:
    os.remove(f)
  unraisable, previous = [], sys.unraisablehook
  sys.unraisablehook = unraisable.append
  try:
    with pytest.warns(RuntimeWarning, match="step 20 .* could not be restored"):
      state, step = ckpt.restore_latest(train.init_states(OBJ, OPT, (0,)))
    gc.collect()
  finally:
    sys.unraisablehook = previous
    ckpt.close()
  assert step == 10 and int(state.step[0]) == 10
  assert [repr(u.exc_value)[:200] for u in unraisable] == []


def test_partial_save_leftover_is_ignored(tmp_path, reference):
  run_fit(tmp_path, num_steps=20)
  # What a kill in the middle of an Orbax save leaves: an uncommitted temporary directory.
  partial = tmp_path / "30.orbax-checkpoint-tmp-123"
  partial.mkdir()
  (partial / "junk").write_bytes(b"\0" * 10)
  final = run_fit(tmp_path)
  assert final.resumed_from == 20
  assert_bitwise(final.state, reference)


def test_relaunch_with_other_settings_is_refused_and_keeps_the_checkpoints(tmp_path):
  # Another model shape, seed count, optimizer or seed is the caller's mistake, not damage: the
  # good checkpoints stay where they are (they used to be moved aside as "corrupt", and the run
  # silently restarted from step 0).
  run_fit(tmp_path, num_steps=10)
  wider = train.Objective(lambda k: {"w": jnp.zeros(7), "b": jnp.zeros(())}, OBJ.sample, OBJ.loss)
  cases = [(dict(objective=wider), r"\['w'\] is stored as float32\[1, 6\], .* float32\[1, 7\]"),
           (dict(seeds=(0, 1)), r"\['key'\] is stored as uint32\[1, 2\], .* uint32\[2, 2\]"),
           (dict(optimizer=optax.sgd(1e-2)), "holds 9 arrays, the state to restore into has 4"),
           (dict(seeds=(7,)), r"seeds: the checkpoint at step 10 .* other seeds than \[7\]")]
  for kw, match in cases:
    ckpt = checkpoint.Checkpointer(tmp_path)
    try:
      with pytest.raises(ValueError, match=match):
        train.fit(kw.get("objective", OBJ), kw.get("optimizer", OPT), 20, seeds=kw.get("seeds", (0,)),
                  steps_per_call=SPC, checkpointer=ckpt, log_fn=None)
    finally:
      ckpt.close()
  assert sorted(os.listdir(tmp_path)) == ["10", "extra"]   # extra: train.fit's skip streak
  with pytest.raises(ValueError, match=r"step: no checkpoint 99 .* steps there: \[10\]"):
    checkpoint.Checkpointer(tmp_path).restore(train.init_states(OBJ, OPT, (0,)), 99)
  with pytest.raises(ValueError, match="directory: expected a directory"):
    checkpoint.Checkpointer(tmp_path / "10" / "_CHECKPOINT_METADATA")


def test_on_chunk_may_keep_a_copy_and_fit_takes_unhashable_objectives():
  import dataclasses

  @dataclasses.dataclass
  class Loss:          # a plain dataclass is unhashable (eq without frozen)
    scale: float

    def __call__(self, params, batch):
      return self.scale * OBJ.loss(params, batch)

  kept = []
  result = train.fit(OBJ._replace(loss=Loss(1.0)), OPT, 10, steps_per_call=SPC, eval_every=SPC, log_fn=None,
                     on_chunk=lambda step, state, m: kept.append(jax.tree_util.tree_map(jnp.copy, state.params)))
  assert len(kept) == 2 and not result.interrupted
  np.testing.assert_array_equal(kept[-1]["w"], result.state.params["w"])
  assert not np.array_equal(kept[0]["w"], kept[1]["w"])
  stopped = train.fit(OBJ, OPT, 10, steps_per_call=SPC, should_stop=lambda: True, log_fn=None)
  assert stopped.interrupted and int(stopped.state.step[0]) == 5
  done = train.fit(OBJ, OPT, 5, steps_per_call=SPC, should_stop=lambda: True, log_fn=None)
  assert not done.interrupted        # the stop came with the last chunk: a finished run
  for bad in (0, "12", (0.5, 1), ()):
    with pytest.raises(ValueError, match="seeds"):
      train.fit(OBJ, OPT, 5, seeds=bad, log_fn=None)


def test_save_refuses_to_overwrite(tmp_path, caplog):
  like = train.init_states(OBJ, OPT, (0,))
  ckpt = checkpoint.Checkpointer(tmp_path)
  ckpt.save(like)
  with pytest.raises(FileExistsError, match="step 0 already exists"):
    ckpt.save(like)
  caplog.set_level(logging.WARNING)
  restored, step = ckpt.restore_latest(like)
  # Orbax's metadata reader warned "Metadata file does not exist" on every restore (a false alarm).
  assert not [r for r in caplog.records if "Metadata file" in r.getMessage()]
  assert step == 0 and jax.random.key_impl(restored.key) == jax.random.key_impl(like.key)
  np.testing.assert_array_equal(jax.random.key_data(restored.key), jax.random.key_data(like.key))


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  # A constant gradient -1 moves w by exactly lr = 1 per Adam step; the 0 * sqrt(8.5 - w) term
  # turns the loss NaN once w > 8.5, i.e. at step 9 -- after the checkpoint of step 5.
  objective = train.Objective(lambda key: {"w": jnp.zeros(())}, lambda key: jnp.zeros(()),
                              lambda p, batch: -p["w"] + 0.0 * jnp.sqrt(8.5 - p["w"]) + batch)
  opt = train.make_optimizer(1.0, clip_norm=None)
  ckpt = checkpoint.Checkpointer(tmp_path)
  with pytest.raises(train.NonFiniteLossError, match=r"at step 9 .*last good checkpoint is step 5") as err:
    train.fit(objective, opt, 20, steps_per_call=5, checkpointer=ckpt, checkpoint_every=5, log_fn=None)
  assert err.value.step == 9
  assert ckpt.steps() == [5]
  like = train.init_states(objective, opt, (0,))
  state, step = ckpt.restore_latest(like)
  direct = train.fit(objective, opt, 5, steps_per_call=5, log_fn=None).state
  assert step == 5
  assert_bitwise(state, direct)
  assert np.isfinite(np.asarray(state.params["w"])).all()



def test_nonfinite_parameters_from_finite_gradients_are_never_saved(tmp_path):
  # An update rule that sends w to -inf on a finite gradient (-1): step 1's loss and gradient are
  # finite, so only the check before saving can catch it; step 1 must not reach the disk.
  objective = train.Objective(lambda key: {"w": jnp.zeros(())}, lambda key: jnp.zeros(()),
                              lambda p, batch: -p["w"] + batch)
  blow_up = optax.GradientTransformation(lambda p: optax.EmptyState(),
                                         lambda g, s, p=None: (jax.tree.map(lambda x: x * jnp.inf, g), s))
  ckpt = checkpoint.Checkpointer(tmp_path)
  with pytest.raises(train.NonFiniteLossError, match=r"non-finite parameters after step 1; not saved.*no checkpoint"):
    train.fit(objective, blow_up, 3, steps_per_call=1, checkpointer=ckpt, checkpoint_every=1, log_fn=None)
  assert ckpt.steps() == []

if __name__ == "__main__":
  _worker(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else -1)


def _damage(step_dir):
  for root, _, files in os.walk(step_dir / "default"):
    for f in files:
      with open(os.path.join(root, f), "wb") as fh:
        fh.write(b"garbage")


def test_restore_checks_counter_dtype_extras_and_moves_every_newer_failure(tmp_path):
  # Paths a mutation audit found untested: the stored step counter must match its directory, a
  # dtype change is a mismatch (not corruption), the extras of kept steps stay, and every newer
  # step that fails is moved aside once an older one restores.
  like = train.init_states(OBJ, OPT, (0,))
  at = lambda s: like._replace(step=jnp.full_like(like.step, s))
  ckpt = checkpoint.Checkpointer(tmp_path / "a", max_to_keep=2)
  ckpt.save(like, step=7)                                  # counter 0 in directory 7
  with pytest.raises(checkpoint.CheckpointRestoreError, match="stored step counter 0 != directory step 7"):
    ckpt.restore_latest(like)
  ckpt = checkpoint.Checkpointer(tmp_path / "b", max_to_keep=2)
  ckpt.save(at(1), extra={"a": 1})
  ckpt.save(at(2), extra={"a": 2})
  assert ckpt.extra(1) == {"a": 1} and ckpt.extra(2) == {"a": 2}
  ckpt.save(at(3), extra={"a": 3})                         # step 1 leaves orbax's window
  assert ckpt.extra(1) == {} and ckpt.extra(2) == {"a": 2}
  half = like._replace(params=jax.tree_util.tree_map(lambda x: x.astype(jnp.float16), like.params))
  with pytest.raises(checkpoint.CheckpointMismatchError, match="stored as float32"):
    ckpt.restore_latest(half)
  ckpt = checkpoint.Checkpointer(tmp_path / "c", max_to_keep=3)
  for s in (10, 20, 30):
    ckpt.save(at(s))
  _damage(tmp_path / "c" / "20")
  _damage(tmp_path / "c" / "30")
  with pytest.warns(RuntimeWarning, match="could not be restored"):
    state, step = ckpt.restore_latest(like)
  assert step == 10 and int(state.step[0]) == 10 and ckpt.steps() == [10]
  assert len([p for p in os.listdir(tmp_path / "c") if p.startswith("corrupt-")]) == 2
