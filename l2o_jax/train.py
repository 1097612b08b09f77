"""Model-agnostic training: an `Objective` (init, sample, loss) plus optax, run as jit-fused
chunks of `lax.scan`-ned steps.

Design (see BUILD_NOTES.md):
- The data for step t is drawn on device from `fold_in(state.key, t)` inside the compiled step,
  so the host never ships batches and a resumed run sees exactly the data it would have seen.
- `steps_per_call` steps run per jit call; the state buffers are donated.
- A non-finite loss or gradient norm is reported in the metrics (sticky for the rest of the
  chunk); `fit` then raises without saving that chunk's state, and it checks the parameters
  are finite before every checkpoint, so a checkpoint on disk is always a good one.
"""
from __future__ import annotations

import functools
import math
import numbers
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from l2o_jax import _checks


class Objective(NamedTuple):
  """What a trainable method provides.

  init(key) -> params (a pytree of arrays).
  sample(key) -> batch: one training batch, drawn on device (pure, jittable).
  loss(params, batch) -> scalar loss to minimise.
  value_and_grad(loss, params, batch) -> (loss value, grads): how a step differentiates `loss`;
    None means `jax.value_and_grad(loss)(params, batch)`. `distributed.data_parallel` sets it.
  """
  init: Callable[[jax.Array], Any]
  sample: Callable[[jax.Array], Any]
  loss: Callable[[Any, Any], jax.Array]
  value_and_grad: Callable[[Callable, Any, Any], tuple] | None = None


class TrainState(NamedTuple):
  params: Any
  opt_state: Any
  step: jax.Array   # int32 scalar: number of updates applied
  key: jax.Array    # data key; step t uses fold_in(key, t)


class NonFiniteLossError(FloatingPointError):
  """Training produced a non-finite loss or gradient; `step` is the first bad step."""

  def __init__(self, step: int, message: str):
    super().__init__(message)
    self.step = step


def make_optimizer(learning_rate: float = 1e-3, *, clip_norm: float | None = 1.0,
                   warmup_steps: int = 0, decay_steps: int | None = None,
                   end_lr_factor: float = 1.0, b2: float = 0.999,
                   weight_decay: float = 0.0) -> optax.GradientTransformation:
  """Adam with optional global-norm clipping, linear warm-up and cosine decay; b2 is Adam's
  second-moment decay, and weight_decay > 0 makes it AdamW (decoupled decay).

  learning_rate is the peak rate (a number; for a custom schedule build the optax chain
  directly). end_lr_factor applies only with decay_steps (cosine decay to learning_rate x
  end_lr_factor); a decay shorter than the warm-up is lengthened to warmup_steps + 1."""
  for name, value in (("learning_rate", learning_rate), ("end_lr_factor", end_lr_factor), ("b2", b2),
                      ("weight_decay", weight_decay), ("clip_norm", 0.0 if clip_norm is None else clip_norm)):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
      raise ValueError(f"{name}: expected a number, got {value!r}")
  if not 0 < learning_rate < math.inf:
    raise ValueError(f"learning_rate: expected a finite number > 0, got {learning_rate}")
  if clip_norm is not None and not 0 <= clip_norm < math.inf:
    # A negative max norm would flip the gradient's sign (gradient ascent); 0 / None mean off.
    raise ValueError(f"clip_norm: expected None (off) or a finite number >= 0, got {clip_norm}")
  if not 0 <= end_lr_factor < math.inf:
    raise ValueError(f"end_lr_factor: expected a finite number >= 0 (final lr / peak), got {end_lr_factor}")
  _checks.check_positive_int("warmup_steps", warmup_steps, minimum=0)
  if decay_steps is not None:
    _checks.check_positive_int("decay_steps", decay_steps, minimum=0)
  if not 0 <= b2 < 1:
    raise ValueError(f"b2: expected 0 <= b2 < 1, got {b2}")
  if not 0 <= weight_decay < math.inf:
    raise ValueError(f"weight_decay: expected a finite number >= 0, got {weight_decay}")
  if decay_steps:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0 if warmup_steps else learning_rate, learning_rate, max(warmup_steps, 0),
        max(decay_steps, warmup_steps + 1), learning_rate * end_lr_factor)
  elif warmup_steps:
    schedule = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  else:
    schedule = learning_rate
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  adam = (optax.adamw(schedule, b2=b2, weight_decay=weight_decay) if weight_decay
          else optax.adam(schedule, b2=b2))
  return optax.chain(*parts, adam)


def init_state(objective: Objective, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
  """Parameters from key(seed) folded with 0, data key folded with 1."""
  root = jax.random.key(seed)
  params = objective.init(jax.random.fold_in(root, 0))
  state = TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32), jax.random.fold_in(root, 1))
  # Own buffers for every leaf: the train chunks donate the state, which would otherwise delete
  # an array that init returned from elsewhere (a module-level constant) or fail on one array
  # returned in two leaves ("donate the same buffer twice").
  return jax.tree_util.tree_map(jnp.copy, state)


def _all_finite(tree) -> jax.Array:
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def make_step(objective: Objective, optimizer: optax.GradientTransformation, *,
              skip_nonfinite: bool = False) -> Callable:
  """One pure update: (state, ok) -> ((state, ok), metrics).

  Default: ok turns False at the first non-finite step and stays False (metrics["finite"]), so
  the caller can stop there. skip_nonfinite=True: a step with a non-finite loss or gradient
  leaves the parameters and optimizer state unchanged (metrics["skipped"]) and training goes on;
  the step counter still advances, so the next step draws a fresh batch.
  """

  def step(carry, _):
    state, ok = carry
    batch = objective.sample(jax.random.fold_in(state.key, state.step))
    if objective.value_and_grad is None:
      loss, grads = jax.value_and_grad(objective.loss)(state.params, batch)
    else:
      loss, grads = objective.value_and_grad(objective.loss, state.params, batch)
    grad_norm = optax.tree.norm(grads)
    # One scalar test instead of a pass over every leaf: a finite norm bounds every g_i^2, so
    # Adam's moments and its (bounded) update stay finite too. By default a non-finite step is
    # not undone in memory: the state is discarded (`fit` raises and never saves it), and `fit`
    # checks the parameters once more before every checkpoint. Selecting old-vs-new state per
    # leaf costs ~40 ms of a ~0.8 s GPT-2 step on 2 cores (`python -m benchmarks.micro
    # --only=update`), so only skipping pays it.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if skip_nonfinite:
      keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
      params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
      ok_now = ok
    else:
      ok_now = ok & finite
    new_state = TrainState(params, opt_state, state.step + 1, state.key)
    return (new_state, ok_now), {"loss": loss, "grad_norm": grad_norm, "finite": ok_now,
                                 "skipped": ~finite if skip_nonfinite else jnp.bool_(False)}

  return step


def make_train_chunk(objective: Objective, optimizer: optax.GradientTransformation,
                     steps_per_call: int, *, skip_nonfinite: bool = False) -> Callable:
  """jit(state) -> (state, metrics): `steps_per_call` fused steps, state donated.

  metrics are (steps_per_call,) arrays: loss, grad_norm, finite, skipped (see `make_step`).
  """
  _checks.check_positive_int("steps_per_call", steps_per_call)
  step = make_step(objective, optimizer, skip_nonfinite=skip_nonfinite)

  @functools.partial(jax.jit, donate_argnums=0)
  def chunk(state):
    (state, _), metrics = jax.lax.scan(step, (state, jnp.bool_(True)), length=steps_per_call)
    return state, metrics

  return chunk


def train(objective: Objective, optimizer: optax.GradientTransformation, num_steps: int, *,
          seed: int = 0, steps_per_call: int = 100, log_every_s: float = 0.0,
          log_fn: Callable[[str], None] | None = print):
  """A plain in-memory training loop for one seed: `fit` without checkpoints.

  Returns (state, losses) with losses a (num_steps,) numpy array of per-step training losses.
  Raises NonFiniteLossError naming the first non-finite step.
  """
  result = fit(objective, optimizer, num_steps, seeds=(seed,), steps_per_call=steps_per_call,
               log_every_s=log_every_s, log_fn=log_fn if log_every_s else None)
  state = jax.tree_util.tree_map(lambda a: a[0], result.state)
  return state, result.losses[0]


# ----------------------------------------------------------------------------------------------
# Several seeds in one program, and the checkpointed training loop used by experiments/.


def init_states(objective: Objective, optimizer: optax.GradientTransformation, seeds) -> TrainState:
  """`init_state` for each seed, stacked along a leading seed axis (S, ...).

  Initialisation runs per seed on the host side (some inits are not traceable, e.g. ones
  that compute a Lipschitz constant as a Python float); training then vmaps over the axis.
  """
  seeds = check_seeds(seeds)
  states = [init_state(objective, optimizer, s) for s in seeds]
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *states)


def check_seeds(seeds) -> list[int]:
  """A non-empty sequence of distinct integer seeds, e.g. (0, 1, 2)."""
  if isinstance(seeds, (str, bytes, numbers.Number)) or not hasattr(seeds, "__iter__"):
    raise ValueError(f"seeds: expected a sequence of integers such as (0,) or range(3), got {seeds!r}")
  seeds = list(seeds)
  for s in seeds:
    if isinstance(s, bool) or not isinstance(s, numbers.Integral):
      raise ValueError(f"seeds: expected integers, got {s!r} in {seeds}")
  seeds = [int(s) for s in seeds]
  if not seeds:
    raise ValueError("seeds: expected at least one seed, got an empty list")
  if len(set(seeds)) != len(seeds):
    raise ValueError(f"seeds: expected distinct seeds, got {seeds}")
  return seeds


def make_seeds_train_chunk(objective: Objective, optimizer: optax.GradientTransformation,
                           steps_per_call: int, skip_nonfinite: bool = False) -> Callable:
  """Like `make_train_chunk` for a stacked state (leading seed axis S): one compiled program
  that trains every seed (jax.vmap of the scanned steps). metrics are (S, steps_per_call).

  Cached on (objective, optimizer, steps_per_call), so repeated `fit` calls with the same
  objective reuse the compiled program (an unhashable objective, e.g. a plain dataclass loss,
  is built afresh each time instead).
  """
  _checks.check_positive_int("steps_per_call", steps_per_call)
  try:
    hash((objective, optimizer))
  except TypeError:
    return _seeds_train_chunk(objective, optimizer, steps_per_call, skip_nonfinite)
  return _cached_seeds_train_chunk(objective, optimizer, steps_per_call, skip_nonfinite)


def _seeds_train_chunk(objective, optimizer, steps_per_call, skip_nonfinite):
  step = make_step(objective, optimizer, skip_nonfinite=skip_nonfinite)

  def one_seed(state):
    (state, _), metrics = jax.lax.scan(step, (state, jnp.bool_(True)), length=steps_per_call)
    return state, metrics

  return jax.jit(jax.vmap(one_seed), donate_argnums=0)


_cached_seeds_train_chunk = functools.lru_cache(maxsize=64)(_seeds_train_chunk)


def first_nonfinite(metrics, first_step: int) -> tuple[int, int, float] | None:
  """(seed index, step, loss) of the earliest non-finite step in (S, T) chunk metrics, or None."""
  finite = np.asarray(metrics["finite"]).reshape(-1, np.shape(metrics["finite"])[-1])
  if finite.all():
    return None
  bad_t = [int(np.argmin(f)) if not f.all() else finite.shape[1] for f in finite]
  seed = int(np.argmin(bad_t))
  loss = float(np.asarray(metrics["loss"]).reshape(finite.shape)[seed, bad_t[seed]])
  return seed, first_step + bad_t[seed], loss


class FitResult(NamedTuple):
  state: TrainState       # stacked over seeds (leading axis S)
  losses: np.ndarray      # (S, steps run in this call) per-step training losses
  resumed_from: int       # step restored from a checkpoint (0 for a fresh start)
  interrupted: bool       # True when stopped early by `should_stop` (a checkpoint was saved)
  skipped: int = 0        # non-finite steps skipped in this call (skip_nonfinite=True), all seeds


def chunk_boundaries(start: int, num_steps: int, steps_per_call: int, *also: int | None) -> list[int]:
  """The chunk end points after `start`: multiples of steps_per_call (and of every `also`
  interval, e.g. eval and checkpoint intervals), plus num_steps.

  They depend on the configuration only, never on where a run resumed, so a resumed run
  executes exactly the same compiled chunks on the same steps as an uninterrupted one.
  """
  intervals = [steps_per_call] + [a for a in also if a]
  ends = {num_steps}
  for every in intervals:
    ends.update(range((start // every + 1) * every, num_steps, every))
  return sorted(e for e in ends if e > start)


def fit(objective: Objective, optimizer: optax.GradientTransformation, num_steps: int, *,
        seeds=(0,), steps_per_call: int = 100, checkpointer=None, checkpoint_every: int | None = None,
        place: Callable[[TrainState], TrainState] | None = None,
        on_chunk: Callable[[int, TrainState, dict], None] | None = None,
        eval_every: int | None = None, should_stop: Callable[[], bool] | None = None,
        instances_per_step: int = 0, log_every_s: float = 10.0,
        log_fn: Callable[[str], None] | None = print, skip_nonfinite: bool = False,
        max_skipped_in_a_row: int = 100) -> FitResult:
  """Trains several seeds together, with checkpoints and exact resume.

  Args:
    objective, optimizer: as for `train`.
    num_steps: total number of updates (a resumed run continues up to it); 0 returns the
      initial state untrained (e.g. to evaluate an initialisation through the same path).
    seeds: seeds trained together in one program (vmap); state i starts from `init_state(seed_i)`.
    steps_per_call: steps fused per jit call.
    checkpointer: a `checkpoint.Checkpointer` (or None): the latest good checkpoint is restored
      first, and one is saved every `checkpoint_every` steps, at the end, and before an early stop.
    place: puts a freshly initialised state on devices (e.g. replicated over a mesh); the
      restored state takes the placement of this template.
    on_chunk: called as on_chunk(step, state, metrics) at every multiple of `eval_every` (and at
      the end) with the (S, T) metrics of the chunk just run; used for evaluation and logging.
      The state's buffers are donated to the next chunk, so copy what you keep
      (`jax.tree_util.tree_map(jnp.copy, state.params)`). It runs before that step's checkpoint
      is saved, so its log lines are never missing after a resume (an on_chunk that raises
      leaves the previous checkpoint as the latest).
    should_stop: polled after every chunk; True saves a checkpoint and returns (SIGTERM/SIGINT).
    instances_per_step: training instances per step and seed, for the instances/s progress line.
    skip_nonfinite: skip (do not apply) steps whose loss or gradient is non-finite instead of
      stopping (`make_step`); the progress line counts them. A seed that skips
      `max_skipped_in_a_row` consecutive steps still stops the run (whatever the chunk grid),
      as does a non-finite parameter before a checkpoint.

  Raises NonFiniteLossError naming the first bad step and the last good checkpoint, which is
  left untouched (the state of the failing chunk is never saved).
  """
  num_steps = _checks.check_positive_int("num_steps", num_steps, minimum=0)
  max_skipped_in_a_row = _checks.check_positive_int("max_skipped_in_a_row", max_skipped_in_a_row)
  steps_per_call = _checks.check_positive_int("steps_per_call", steps_per_call)
  for name, value in (("checkpoint_every", checkpoint_every), ("eval_every", eval_every)):
    if value is not None:
      _checks.check_positive_int(name, value)
  seeds = check_seeds(seeds)
  state = init_states(objective, optimizer, seeds)
  if place is not None:
    state = place(state)
  start = 0
  run_at_start = np.zeros(len(seeds), np.int64)
  if checkpointer is not None:
    restored = checkpointer.restore_latest(state)
    if restored is not None:
      if not np.array_equal(jax.random.key_data(restored[0].key), jax.random.key_data(state.key)):
        raise ValueError(f"seeds: the checkpoint at step {restored[1]} in {checkpointer.directory} was "
                         f"trained with other seeds than {seeds} (its data keys differ); use that "
                         "run's seeds or another directory")
      state, start = restored
      # The streak of consecutive skipped steps at that step, so a streak cut by the restart
      # stops the run where an uninterrupted run would (saved beside each checkpoint).
      saved_run = checkpointer.extra(start).get("skipped_in_a_row")
      if saved_run is not None and len(saved_run) == len(seeds):
        run_at_start = np.asarray(saved_run, np.int64)
      if log_fn:
        log_fn(f"resumed from checkpoint step {start} in {checkpointer.directory}")
  if start > num_steps:
    raise ValueError(f"num_steps: the workdir holds a checkpoint at step {start}, past num_steps={num_steps}")
  chunks: dict[int, Callable] = {}
  losses, t0, last_log, done_at_start, first_chunk_end = [], time.time(), 0.0, start, None
  skipped = 0
  run = run_at_start   # per seed: consecutive skipped steps up to `step`
  step = start
  for end in chunk_boundaries(start, num_steps, steps_per_call, eval_every, checkpoint_every):
    length = end - step
    if length not in chunks:
      chunks[length] = make_seeds_train_chunk(objective, optimizer, length, skip_nonfinite)
    state, metrics = chunks[length](state)
    skipped_now = np.asarray(metrics["skipped"]).reshape(len(seeds), -1)
    skipped += int(skipped_now.sum())
    # Host loop over the chunk's (S, T) flags, once per chunk (already on the host for the count).
    for seed_i, row in enumerate(skipped_now):
      for t, bad in enumerate(row):
        run[seed_i] = run[seed_i] + 1 if bad else 0
        if run[seed_i] >= max_skipped_in_a_row:
          last = step + t
          raise NonFiniteLossError(
              last, f"{max_skipped_in_a_row} steps in a row ({last - max_skipped_in_a_row + 1}.."
              f"{last}) were non-finite and skipped (seed {seeds[seed_i]}); stopped; "
              f"{_last_good(checkpointer)}")
    bad = first_nonfinite(metrics, step)
    if bad is not None:
      seed_i, bad_step, loss = bad
      raise NonFiniteLossError(bad_step, f"non-finite loss/gradient at step {bad_step} (seed "
                               f"{seeds[seed_i]}, loss={loss}); stopped; {_last_good(checkpointer)}")
    losses.append(np.asarray(metrics["loss"]))
    step = end
    if on_chunk is not None and ((eval_every and step % eval_every == 0) or step == num_steps):
      on_chunk(step, state, metrics)
    stop = _agree(should_stop()) if should_stop is not None else False
    if checkpointer is not None and (stop or step == num_steps or
                                     (checkpoint_every and step % checkpoint_every == 0)):
      if step not in checkpointer.steps():
        # The per-step test covers the loss and gradients; parameters pushed to inf/NaN by an
        # update with finite gradients (possible with a custom optimizer) are caught here.
        if not bool(_tree_finite(state.params)):
          raise NonFiniteLossError(step, f"non-finite parameters after step {step}; not saved; "
                                   f"stopped; {_last_good(checkpointer)}")
        checkpointer.save(state, extra={"skipped_in_a_row": run.tolist()})
    now = time.time()
    if first_chunk_end is None:
      # Rates exclude the first chunk, which includes compilation.
      first_chunk_end = (now, step)
    if log_fn and (now - last_log >= log_every_s or step == num_steps or stop):
      last_log = now
      loss_now = float(np.mean(finite_mean(losses[-1])))   # over the chunk, skipped steps left out
      if step > first_chunk_end[1]:
        t_ref, s_ref = first_chunk_end
        rate = (step - s_ref) / max(now - t_ref, 1e-9)
        speed = (f"{rate * instances_per_step * len(seeds):,.0f} instances/s  {rate:,.1f} steps/s  "
                 f"eta {_fmt_seconds((num_steps - step) / max(rate, 1e-9))}")
      else:   # only the first chunk so far: its time is mostly compilation, no rate to project
        speed = f"first chunk incl. compilation {_fmt_seconds(now - t0)}"
      log_fn(f"step {step}/{num_steps}  loss {loss_now:.4g}  {speed}"
             + (f"  skipped non-finite steps: {skipped}" if skipped else ""))
    if stop:
      if log_fn:
        where = f" (checkpoint step {step} saved)" if checkpointer is not None else ""
        log_fn(f"stop requested: exiting at step {step}{where}")
      # A stop requested during the last chunk still leaves a finished run.
      return FitResult(state, _cat(losses, len(seeds)), start, step < num_steps, skipped)
  return FitResult(state, _cat(losses, len(seeds)), start, False, skipped)


def _agree(stop: bool) -> bool:
  """Whether any process asks to stop. Each process polls its own signal flag, and a signal can
  reach them on either side of a chunk boundary: one process entering the checkpoint save while
  another enters the next chunk's all-reduce would wait for each other forever."""
  if jax.process_count() == 1:
    return bool(stop)
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.asarray([stop], np.int32))))


def finite_mean(losses) -> np.ndarray:
  """Mean over the last axis of the finite entries (skipped steps carry their non-finite loss);
  NaN where a row has none."""
  losses = np.asarray(losses, np.float64)
  ok = np.isfinite(losses)
  with np.errstate(invalid="ignore"):
    return np.where(ok, losses, 0.0).sum(-1) / ok.sum(-1)


_tree_finite = jax.jit(_all_finite)


def _last_good(checkpointer) -> str:
  last = checkpointer.latest_step() if checkpointer is not None else None
  return (f"the last good checkpoint is step {last} in {checkpointer.directory} (left intact)"
          if last is not None else "no checkpoint was saved")


def _cat(losses, num_seeds):
  return np.concatenate(losses, axis=-1) if losses else np.zeros((num_seeds, 0), np.float32)


def _fmt_seconds(s: float) -> str:
  s = int(round(s))
  return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class StopOnSignal:
  """Context manager: SIGTERM / SIGINT set a flag (call the object) instead of killing the process,
  so the training loop can save a checkpoint at the next chunk boundary and exit cleanly. A
  second SIGINT raises KeyboardInterrupt as usual; a second SIGTERM (a scheduler's or
  `timeout`'s follow-up) gets the handler that was there before, by default termination."""

  def __init__(self):
    self.signum = None
    self._old = {}

  def __call__(self) -> bool:
    return self.signum is not None

  def _handle(self, signum, frame):
    import signal
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    if self.signum is not None and signum == signal.SIGTERM:
      old = self._old.get(signum) or signal.SIG_DFL   # None: a handler not set from Python
      signal.signal(signum, old)
      if callable(old):
        old(signum, frame)
      elif old == signal.SIG_DFL:   # terminate as without a handler (SIG_IGN: ignore it)
        os.kill(os.getpid(), signum)
      return
    self.signum = signum

  def __enter__(self):
    import signal
    import threading
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    import signal
    for sig, old in self._old.items():
      signal.signal(sig, old)
    return False
