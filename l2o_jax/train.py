"""Model-agnostic training: an `Objective` (init, sample, loss) plus optax, run as jit-fused
chunks of `lax.scan`-ned steps.

Design (see BUILD_NOTES.md):
- The data for step t is drawn on device from `fold_in(state.key, t)` inside the compiled step,
  so the host never ships batches and a resumed run sees exactly the data it would have seen.
- `steps_per_call` steps run per jit call; the state buffers are donated.
- A non-finite loss or gradient freezes the state at the last good step for the rest of the
  chunk and is reported in the metrics, so the caller can stop with the last good parameters.
"""
from __future__ import annotations

import functools
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
  """
  init: Callable[[jax.Array], Any]
  sample: Callable[[jax.Array], Any]
  loss: Callable[[Any, Any], jax.Array]


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
                   end_lr_factor: float = 1.0) -> optax.GradientTransformation:
  """Adam with optional global-norm clipping, linear warm-up and cosine decay."""
  if not learning_rate > 0:
    raise ValueError(f"learning_rate: expected > 0, got {learning_rate}")
  if decay_steps:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0 if warmup_steps else learning_rate, learning_rate, max(warmup_steps, 0),
        max(decay_steps, warmup_steps + 1), learning_rate * end_lr_factor)
  elif warmup_steps:
    schedule = optax.linear_schedule(0.0, learning_rate, warmup_steps)
  else:
    schedule = learning_rate
  parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  return optax.chain(*parts, optax.adam(schedule))


def init_state(objective: Objective, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
  """Parameters from key(seed) folded with 0, data key folded with 1."""
  root = jax.random.key(seed)
  params = objective.init(jax.random.fold_in(root, 0))
  return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32), jax.random.fold_in(root, 1))


def _all_finite(tree) -> jax.Array:
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def make_step(objective: Objective, optimizer: optax.GradientTransformation) -> Callable:
  """One pure update: (state, ok) -> ((state, ok), metrics). Skips updates once ok is False."""

  def step(carry, _):
    state, ok = carry
    batch = objective.sample(jax.random.fold_in(state.key, state.step))
    loss, grads = jax.value_and_grad(objective.loss)(state.params, batch)
    finite = jnp.isfinite(loss) & _all_finite(grads)
    ok_now = ok & finite
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(ok_now, a, b), new, old)
    new_state = TrainState(keep(params, state.params), keep(opt_state, state.opt_state),
                           jnp.where(ok_now, state.step + 1, state.step), state.key)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "finite": finite & ok}
    return (new_state, ok_now), metrics

  return step


def make_train_chunk(objective: Objective, optimizer: optax.GradientTransformation,
                     steps_per_call: int) -> Callable:
  """jit(state) -> (state, metrics): `steps_per_call` fused steps, state donated.

  metrics are (steps_per_call,) arrays: loss, grad_norm, finite.
  """
  _checks.check_positive_int("steps_per_call", steps_per_call)
  step = make_step(objective, optimizer)

  @functools.partial(jax.jit, donate_argnums=0)
  def chunk(state):
    (state, _), metrics = jax.lax.scan(step, (state, jnp.bool_(True)), length=steps_per_call)
    return state, metrics

  return chunk


def check_finite_chunk(metrics, first_step: int) -> None:
  """Raises NonFiniteLossError naming the first non-finite step of a chunk."""
  finite = np.asarray(metrics["finite"])
  if not finite.all():
    bad = first_step + int(np.argmin(finite))
    loss = float(np.asarray(metrics["loss"])[int(np.argmin(finite))])
    raise NonFiniteLossError(bad, f"non-finite loss/gradient at step {bad} (loss={loss}); "
                             f"parameters kept at the last good step {bad}")


def train(objective: Objective, optimizer: optax.GradientTransformation, num_steps: int, *,
          seed: int = 0, steps_per_call: int = 100, state: TrainState | None = None,
          log_every: int = 0, log_fn: Callable[[str], None] = print):
  """A plain in-memory training loop (no checkpoints; see experiments/ for the launcher).

  Returns (state, losses) with losses a (num_steps,) numpy array of per-step training losses.
  """
  num_steps = _checks.check_positive_int("num_steps", num_steps)
  steps_per_call = min(_checks.check_positive_int("steps_per_call", steps_per_call), num_steps)
  if state is None:
    state = init_state(objective, optimizer, seed)
  chunk = make_train_chunk(objective, optimizer, steps_per_call)
  losses, done, t0 = [], 0, time.time()
  while done < num_steps:
    if num_steps - done < steps_per_call:
      chunk = make_train_chunk(objective, optimizer, num_steps - done)
    first = int(state.step)
    state, metrics = chunk(state)
    check_finite_chunk(metrics, first)
    losses.append(np.asarray(metrics["loss"]))
    done += len(losses[-1])
    if log_every and (done // log_every) != ((done - len(losses[-1])) // log_every):
      log_fn(f"step {done}/{num_steps} loss {float(losses[-1][-1]):.4g} ({time.time() - t0:.1f}s)")
  return state, np.concatenate(losses)
