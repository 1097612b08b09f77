"""Orbax checkpoints of a `train.TrainState` (params, optimizer state, step, data key).

The only module that imports orbax. Design:
- `orbax.checkpoint.CheckpointManager` with `args.StandardSave` / `args.StandardRestore`,
  synchronous saves (a save returns only once the step directory is committed, so a signal
  handler can save and exit), the last `max_to_keep` steps kept.
- Orbax writes each step into a temporary directory and renames it when complete, so a run
  killed mid-save leaves no half-written step; leftovers are cleaned up on the next start.
- Typed PRNG keys cannot be serialised: the key is stored as `jax.random.key_data` (uint32) and
  re-wrapped with the template's key implementation on restore.
- A step whose stored arrays do not match the template (another model, shape, dtype, seed count
  or optimizer) raises `CheckpointMismatchError` and is left untouched: that is a wrong
  relaunch, not a damaged file, and moving good checkpoints aside would lose the run.
- A latest step that fails to restore (truncated or corrupted files) is moved aside to
  `corrupt-<step>-<time>` with a warning once an older step has restored cleanly; it is never
  deleted and never silently overwritten (orbax skips saving a step that already exists, so a
  corrupt step left in place would also block the resumed run from saving it again). When no
  step restores, nothing is moved and the error is raised: a failure that every step shares (an
  I/O error, too many open files, no memory) is not corruption, and moving them all aside would
  restart a long run from step 0.
- `save(..., extra={...})` keeps a small JSON dict beside a step (`extra/<step>.json`, written
  before the step itself), for host-side training state that is not an array (`train.fit`'s
  count of consecutive skipped steps); `extra(step)` reads it back ({} when absent).
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import sys
import time
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from l2o_jax import _checks


class CheckpointMismatchError(ValueError):
  """The stored state does not have the template's structure, shapes or dtypes."""


class CheckpointRestoreError(RuntimeError):
  """Checkpoints exist but none of them could be restored (nothing was moved aside)."""


@contextlib.contextmanager
def _without_log(text: str):
  """Drops absl log records containing `text` for the duration. The standalone reader looks for
  the step's _CHECKPOINT_METADATA inside the item folder, where a CheckpointManager never writes
  it, and warned on every restore (the read itself is fine: the arrays' metadata is there)."""
  drop = lambda record: text not in record.getMessage()
  logger = logging.getLogger("absl")
  logger.addFilter(drop)
  try:
    yield
  finally:
    logger.removeFilter(drop)


class Checkpointer:
  """Periodic checkpoints of a TrainState-like NamedTuple (params, opt_state, step, key).

  Usage:
    ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=3)
    restored = ckpt.restore_latest(state)  # None when there is nothing to restore
    ckpt.save(state)                       # step taken from state.step (a leading seed axis is fine)
  """

  def __init__(self, directory, *, max_to_keep: int = 3):
    self.directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(self.directory) and not os.path.isdir(self.directory):
      raise ValueError(f"directory: expected a directory for the checkpoints, got the file {self.directory}")
    self.max_to_keep = _checks.check_positive_int("max_to_keep", max_to_keep)
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=self.max_to_keep, create=True, cleanup_tmp_directories=True,
        enable_async_checkpointing=False)
    return ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    """Committed checkpoint steps, oldest first."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def save(self, state, *, step: int | None = None, extra: dict | None = None) -> int:
    """Saves `state` under `step` (default: its step counter) and returns that step; `extra`, a
    JSON-serialisable dict, is kept beside it (`extra(step)`).

    Raises FileExistsError rather than overwrite an existing step with different contents.
    """
    step = _state_step(state) if step is None else int(step)
    if step in self._manager.all_steps():
      raise FileExistsError(f"checkpoint step {step} already exists in {self.directory}; "
                            "refusing to overwrite it")
    if extra is not None and jax.process_index() == 0:
      # Before the step: a step on disk then always has its extra (a kill in between leaves an
      # extra without a step, which nothing reads).
      os.makedirs(self._extra_dir, exist_ok=True)
      path = os.path.join(self._extra_dir, f"{step}.json")
      with open(path + ".tmp", "w") as f:
        json.dump(extra, f)
      os.replace(path + ".tmp", path)
    self._manager.save(step, args=ocp.args.StandardSave(_to_tree(state)), force=True)
    self._manager.wait_until_finished()
    if jax.process_index() == 0 and os.path.isdir(self._extra_dir):
      kept = set(self._manager.all_steps())
      for name in os.listdir(self._extra_dir):   # those of steps orbax no longer keeps
        stem = name.split(".")[0]
        if stem.isdigit() and int(stem) not in kept and int(stem) < step:
          os.remove(os.path.join(self._extra_dir, name))
    return step

  @property
  def _extra_dir(self) -> str:
    return os.path.join(self.directory, "extra")

  def extra(self, step: int) -> dict:
    """The `extra` dict saved with `step`, or {} (none saved, or an older checkpoint)."""
    try:
      with open(os.path.join(self._extra_dir, f"{int(step)}.json")) as f:
        return json.load(f)
    except (OSError, ValueError):
      return {}

  def restore(self, like, step: int):
    """Restores step `step` into the structure, shapes, dtypes and shardings of `like`.

    Raises CheckpointMismatchError (naming the first differing array) when the stored state has
    another structure, shape or dtype, and ValueError for a step that is not there."""
    step = int(step)
    if step not in self._manager.all_steps():
      raise ValueError(f"step: no checkpoint {step} in {self.directory}; steps there: {self.steps()}")
    self._check_matches(step, like)
    target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, _to_tree(like))
    restored = self._manager.restore(step, args=ocp.args.StandardRestore(target))
    return _from_tree(restored, like)

  def restore_latest(self, like, *, quarantine: bool = True):
    """(state, step) from the newest step that restores cleanly, or None if there are no steps.

    Newer steps that fail to restore are moved aside with a warning once an older one has
    restored (see the module docstring); with `quarantine=False` (read-only use, e.g. analysis)
    they are only warned about. Raises CheckpointRestoreError, moving nothing, when no step
    restores.
    """
    with _quiet_abandoned_reads():
      return self._restore_latest(like, quarantine)

  def _restore_latest(self, like, quarantine: bool):
    failed = []   # (step, failure) of newer steps that did not restore
    for step in reversed(self.steps()):
      try:
        state = self.restore(like, step)
        if _state_step(state) != step:
          raise ValueError(f"stored step counter {_state_step(state)} != directory step {step}")
      except CheckpointMismatchError:
        raise   # readable but for another run: the caller's mistake, the files stay where they are
      except Exception as e:  # any other failure to read a step means it is unusable
        failed.append((step, f"{type(e).__name__}: {str(e)[:200]}"))
        gc.collect()   # the failed reads, while _quiet_abandoned_reads filters their tracebacks
        continue
      for bad, failure in failed:
        where = f"moved it to {self._quarantine(bad)}" if quarantine else "left in place"
        warnings.warn(f"checkpoint step {bad} in {self.directory} could not be restored "
                      f"({failure}); {where}; using step {step}", RuntimeWarning, stacklevel=3)
      return state, step
    if failed:
      raise CheckpointRestoreError(
          f"no checkpoint in {self.directory} could be restored, so none was moved aside (a "
          f"failure they all share, such as an I/O error, is not corruption): "
          + "; ".join(f"step {s}: {f}" for s, f in failed)
          + ". Fix the cause and relaunch, or move the steps away to start over")
    return None

  def _check_matches(self, step: int, like) -> None:
    try:
      # Read with a standalone checkpointer: a manager that has not saved in this process does
      # not know the item's handler and returns no metadata.
      with ocp.StandardCheckpointer() as reader, _without_log("Metadata file does not exist"):
        meta = reader.metadata(os.path.join(self.directory, str(step), "default"))
      stored = getattr(meta, "item_metadata", meta).tree
    except Exception:   # unreadable metadata: the restore itself will fail and say so
      return
    stored = jax.tree_util.tree_leaves(stored, is_leaf=lambda x: hasattr(x, "shape"))
    want = jax.tree_util.tree_flatten_with_path(_to_tree(like))[0]
    where = f"checkpoint step {step} in {self.directory}"
    if len(stored) != len(want):
      raise CheckpointMismatchError(
          f"{where} holds {len(stored)} arrays, the state to restore into has {len(want)}: another "
          "model or optimizer (e.g. clipping on/off) than the run that wrote it; use that run's "
          "settings or another directory")
    for (path, w), s in zip(want, stored):
      if tuple(s.shape) != tuple(np.shape(w)) or np.dtype(s.dtype) != np.dtype(w.dtype):
        raise CheckpointMismatchError(
            f"{where}: {jax.tree_util.keystr(path)} is stored as {s.dtype}{list(s.shape)}, the state to "
            f"restore into has {w.dtype}{list(np.shape(w))} (a leading axis is the seed count); use the "
            "run's own settings or another directory")

  def _quarantine(self, step: int) -> str:
    self._manager.close()
    src = os.path.join(self.directory, str(step))
    dst = os.path.join(self.directory, f"corrupt-{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    suffix = 0
    while os.path.exists(dst + (f"-{suffix}" if suffix else "")):
      suffix += 1
    dst += f"-{suffix}" if suffix else ""
    # With several processes (multi-host) every one of them fails on the step: one moves it.
    if jax.process_index() == 0:
      os.rename(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"l2o_jax.checkpoint: moved step {step} aside")
    self._manager = self._open()
    return dst

  def close(self) -> None:
    self._manager.close()


@contextlib.contextmanager
def _quiet_abandoned_reads():
  """Silences the stray tracebacks of orbax reads abandoned by a failed restore.

  orbax reads a step's arrays as concurrent coroutines on an event loop of its own. When one read
  fails, the loop is closed with the other reads unfinished: their coroutines print "Exception
  ignored in <coroutine ...>" when garbage-collected (at a random later time, often at exit), and
  TensorStore's completion callbacks for them print "RuntimeError: Event loop is closed", each a
  ~60-line traceback around the one warning that matters. Within this context those two kinds go
  nowhere (the caller collects the failed reads inside it, only after a failure: a full
  gc.collect() costs ~80 ms); anything else unraisable still goes to the previous hook.
  """
  def abandoned(u) -> bool:
    code = getattr(u.object, "cr_code", None)
    if code is not None:
      return f"{os.sep}orbax{os.sep}" in code.co_filename
    tb = u.exc_traceback
    while tb is not None and tb.tb_next is not None:
      tb = tb.tb_next
    return (u.object is None and isinstance(u.exc_value, RuntimeError)
            and str(u.exc_value) == "Event loop is closed" and tb is not None
            and tb.tb_frame.f_code.co_filename.endswith(os.path.join("asyncio", "base_events.py")))

  previous = sys.unraisablehook
  sys.unraisablehook = lambda u: None if abandoned(u) else previous(u)
  try:
    yield
  finally:
    sys.unraisablehook = previous


def _state_step(state) -> int:
  # With a leading seed axis every entry is the same step (they advance together).
  steps = np.asarray(state.step)
  if steps.size > 1 and not np.all(steps == steps.flat[0]):
    raise ValueError(f"state.step: expected the same step for every seed, got {steps.tolist()}")
  return int(steps.flat[0])


def _to_tree(state) -> dict[str, Any]:
  return {"params": state.params, "opt_state": state.opt_state, "step": state.step,
          "key": jax.random.key_data(state.key)}


def _from_tree(tree: dict[str, Any], like):
  # Orbax may return plain containers; rebuild the exact pytree structure of the template.
  structure = jax.tree_util.tree_structure(like.opt_state)
  opt_state = jax.tree_util.tree_unflatten(structure, jax.tree_util.tree_leaves(tree["opt_state"]))
  params = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(like.params),
                                        jax.tree_util.tree_leaves(tree["params"]))
  key = jax.random.wrap_key_data(tree["key"], impl=jax.random.key_impl(like.key))
  return type(like)(params, opt_state, tree["step"], key)
