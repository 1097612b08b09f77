"""Argument checks run at the Python boundary, before any tracing.

Every public function validates shapes and ranges here so that a bad call fails with a
`ValueError` that names the argument, the shape or value seen, and what was expected,
instead of surfacing later as an XLA trace error or, worse, as silent broadcasting.
Checks on *values* are skipped for traced arrays (their values are unknown at trace time);
checks on *shapes* always run.
"""
from __future__ import annotations

import inspect
import numbers

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
  """True when `x` has a value now (not a tracer inside jit/vmap/grad)."""
  return not isinstance(x, jax.core.Tracer)


def check_host(name: str, x, why: str) -> None:
  """Rejects a traced `x` (inside jit / vmap / grad) for functions that compute on the host, with
  the reason instead of JAX's TracerArrayConversionError from deep inside NumPy."""
  if x is not None and not is_concrete(x):
    raise ValueError(f"{name}: got a traced value; {why}, so call it outside jit / vmap / grad")


def shape_of(name: str, x) -> tuple[int, ...]:
  try:
    return tuple(np.shape(x))
  except Exception as e:  # pragma: no cover - exotic inputs
    raise ValueError(f"{name}: expected an array, got {type(x).__name__}") from e


def check_ndim(name: str, x, ndim: int, what: str) -> tuple[int, ...]:
  shape = shape_of(name, x)
  if len(shape) != ndim:
    raise ValueError(f"{name}: expected a {ndim}-D array {what}, got shape {shape}")
  return shape


def check_finite(name: str, x, what: str = "entries") -> None:
  """Rejects NaN or inf in a concrete array (a traced one is left to the caller's computation)."""
  if x is not None and is_concrete(x) and not np.all(np.isfinite(np.asarray(x, np.float64))):
    raise ValueError(f"{name}: expected finite {what}, got NaN or inf")


def check_positive_int(name: str, value, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
  if value < minimum:
    raise ValueError(f"{name}: expected an integer >= {minimum}, got {value}")
  return int(value)


def check_nonnegative(name: str, value) -> None:
  """Rejects negative scalars or arrays with a negative entry (when concrete)."""
  shape = shape_of(name, value)
  if not is_concrete(value):
    return
  arr = np.asarray(value)
  if not np.all(np.isfinite(arr)):
    raise ValueError(f"{name}: expected finite values >= 0, got {arr if arr.size < 8 else 'non-finite entries'}")
  if np.any(arr < 0):
    shown = arr if arr.size < 8 else arr.min()
    raise ValueError(f"{name}: expected values >= 0, got {shown} (shape {shape})")


def check_score_clip(score_clip) -> float | None:
  """None (the paper's ReLU attention) or a Python number c > 0 (each attention weight capped at
  c). Static: it selects the program, so a traced or array value is rejected."""
  if score_clip is None:
    return None
  if isinstance(score_clip, bool) or not isinstance(score_clip, numbers.Real) or not score_clip > 0:
    raise ValueError(f"score_clip: expected None or a number > 0, got {score_clip!r}")
  return float(score_clip)


def check_key(name: str, key) -> None:
  """Rejects the common mistake of an int seed where a `jax.random.key` is expected."""
  if isinstance(key, (bool, numbers.Integral)):
    raise ValueError(f"{name}: expected a jax.random.key, got the int {key!r}; use jax.random.key({key!r})")


def check_keywords(name: str, kwargs: dict, fn, *, exclude=()) -> None:
  """Rejects keywords that `fn` does not take (a misspelt `num_layer=`) with a ValueError naming
  `name` and the accepted ones, instead of Python's TypeError from deep inside a constructor.
  The accepted names come from `fn`'s signature, minus `exclude` (those the caller sets)."""
  params = inspect.signature(fn).parameters
  accepted = sorted(k for k, p in params.items()
                    if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and k not in exclude)
  unknown = sorted(set(kwargs) - set(accepted))
  if unknown:
    where = f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"
    raise ValueError(f"{name}: unknown keyword(s) {unknown}; {where} accepts {accepted}")


def _dtype_source(a):
  # A Python list or tuple is an array-like whose dtype NumPy infers (jnp.result_type rejects it);
  # Python scalars stay as they are, so they keep JAX's weak typing.
  return np.asarray(a) if isinstance(a, (list, tuple)) else a


def float_dtype(*arrays):
  """The floating dtype the numerics run in: the arrays' common type, at least float32 (ints and
  bools become float32; float64 stays float64 under `jax.enable_x64`). Array-likes (lists) count
  as the NumPy arrays they make."""
  return jnp.result_type(*map(_dtype_source, arrays), jnp.float32)


def as_float(*arrays, like=()) -> tuple:
  """The arrays (or array-likes) as jax arrays of one floating dtype (`float_dtype` of them and of
  the arrays in `like`, e.g. a model's parameters, which are not converted), so integer data is
  not truncated by float weights (a 1/i mask cast to int is 0) and a `lax.scan` carry keeps one
  type. Call it after the shape checks, which name the argument."""
  dtype = float_dtype(*arrays, *jax.tree_util.tree_leaves(like))
  return tuple(jnp.asarray(a, dtype) for a in arrays)


def check_instance(X, y) -> tuple[int, int]:
  """A single sparse-recovery instance: X (n, d) and y (n,). Returns (n, d)."""
  n, d = check_ndim("X", X, 2, "(n, d) for a single instance; vmap over a batch")
  y_shape = check_ndim("y", y, 1, f"(n,) = ({n},) matching X's rows")
  if y_shape[0] != n:
    raise ValueError(f"y: expected shape ({n},) to match X's {n} rows (X has shape {(n, d)}), got {y_shape}")
  return n, d
