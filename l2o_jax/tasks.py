"""In-context sparse recovery instances (paper section 4.1 and section 6, "Problem setup").

An instance is (X, y, x_query, y_query, beta): beta* is S-sparse with a uniformly random
support (optionally inside a prior set, Figure 1b), nonzero values N(0, 1); the rows of X and
x_query are i.i.d. N(0, diag(x_std^2)); y = X beta* + noise and y_query = x_query^T beta*
(+ noise). The paper's setting is d = 20, N = 10, S = 3, noiseless.
"""
from __future__ import annotations

import functools
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from l2o_jax import _checks


class Task(NamedTuple):
  """A batch of in-context sparse recovery instances.

  X: (B, n, d) measurement matrices (rows are the demonstrations x_i).
  y: (B, n) labels y_i = x_i^T beta* (+ noise).
  x_query: (B, d) the query x_{N+1}.
  y_query: (B,) its label.
  beta: (B, d) the S-sparse ground truth beta*.
  """
  X: jax.Array
  y: jax.Array
  x_query: jax.Array
  y_query: jax.Array
  beta: jax.Array


def check_task(task, name: str = "task") -> tuple[int, int, int]:
  """Validates a batch of tasks (a `Task` with consistent shapes); returns (B, N, d)."""
  if not isinstance(task, Task):
    raise ValueError(f"{name}: expected an l2o_jax.Task (e.g. from sample_tasks), got {type(task).__name__}")
  B, N, d = _checks.check_ndim(f"{name}.X", task.X, 3, "(B, N, d)")
  want = {"y": (B, N), "x_query": (B, d), "y_query": (B,), "beta": (B, d)}
  for field, shape in want.items():
    got = _checks.shape_of(f"{name}.{field}", getattr(task, field))
    if got != shape:
      raise ValueError(f"{name}.{field}: expected shape {shape} to match {name}.X {(B, N, d)}, got {got}")
  return B, N, d


def support_indices(support, d: int, s: int) -> np.ndarray:
  """Resolves a support prior (None, int k = first k coordinates, or index array) to indices."""
  if support is None:
    idx = np.arange(d)
  elif isinstance(support, numbers.Integral) and not isinstance(support, bool):
    if not 1 <= support <= d:
      raise ValueError(f"support: expected an int k with 1 <= k <= d={d} (the first k coordinates), got {support}")
    idx = np.arange(int(support))
  else:
    if not _checks.is_concrete(support):
      raise ValueError("support: expected a concrete int or index array, got a traced value")
    idx = np.asarray(support)
    if idx.ndim == 0:
      raise ValueError(f"support: expected an int k (the first k coordinates) or a 1-D index array, got a "
                       f"0-d array {support!r}; pass int(support) for the first k")
    if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
      raise ValueError(f"support: expected a non-empty 1-D integer index array, got shape {idx.shape} dtype {idx.dtype}")
    if idx.min() < 0 or idx.max() >= d:
      raise ValueError(f"support: expected indices in [0, {d}), got min {idx.min()} max {idx.max()}")
    if np.unique(idx).size != idx.size:
      raise ValueError(f"support: expected distinct indices, got {idx.tolist()}")
  if s > idx.size:
    where = f"d={d}" if support is None else f"size of the support prior ({idx.size})"
    raise ValueError(f"s: expected s <= {where}, got s={s}")
  return idx


def support_mask(support, d: int) -> np.ndarray:
  """A (d,) float mask that is 1 on the support prior and 0 elsewhere."""
  mask = np.zeros(d, np.float32)
  mask[support_indices(support, d, 1)] = 1.0
  return mask


def sample_tasks(key, batch: int, *, d: int = 20, n: int = 10, s: int = 3, support=None,
                 noise_std=0.0, x_std=None, X=None) -> Task:
  """Samples `batch` in-context sparse recovery instances (section 4.1), on device.

  Args:
    key: a `jax.random.key` (or legacy uint32 key).
    batch: number of instances B >= 1.
    d: ambient dimension of beta*.
    n: number of demonstrations N.
    s: sparsity S (exactly S nonzero entries; 1 <= S <= d).
    support: prior support set -- None (all of [0, d)), an int k (the first k coordinates, as in
      the paper's Figure 1b with k = 10) or an index array. The S nonzeros are drawn uniformly
      inside it.
    noise_std: standard deviation of Gaussian label noise on y and y_query (paper: 0).
    x_std: None (identity covariance), a scalar, or a (d,) vector of standard deviations
      sigma_i: rows of X ~ N(0, diag(sigma^2)).
    X: optional fixed (n, d) measurement matrix shared by every instance (the classical LISTA
      protocol). By default every instance has its own X (the in-context protocol).

  Returns:
    A `Task` with X (B, n, d), y (B, n), x_query (B, d), y_query (B,), beta (B, d).

  Works under `jax.jit` when batch, d, n, s and support are static.
  """
  batch = _checks.check_positive_int("batch", batch)
  d = _checks.check_positive_int("d", d)
  n = _checks.check_positive_int("n", n)
  s = _checks.check_positive_int("s", s)
  if s > d:
    raise ValueError(f"s: expected 1 <= s <= d={d}, got s={s}")
  idx = support_indices(support, d, s)
  if _checks.shape_of("noise_std", noise_std) != ():
    raise ValueError(f"noise_std: expected a scalar, got shape {_checks.shape_of('noise_std', noise_std)}")
  _checks.check_nonnegative("noise_std", noise_std)
  if x_std is None:
    x_std = jnp.ones((d,), jnp.float32)
  else:
    x_shape = _checks.shape_of("x_std", x_std)
    if x_shape not in ((), (d,)):
      raise ValueError(f"x_std: expected a scalar or shape ({d},), got shape {x_shape}")
    _checks.check_nonnegative("x_std", x_std)
    x_std = jnp.broadcast_to(jnp.asarray(x_std, jnp.float32), (d,))
  if X is not None:
    x_fixed = _checks.check_ndim("X", X, 2, f"(n, d) = ({n}, {d}) shared by all instances")
    if x_fixed != (n, d):
      raise ValueError(f"X: expected shape (n, d) = ({n}, {d}), got {x_fixed}")
    _checks.check_finite("X", X, "entries in the fixed measurement matrix")
    X = jnp.asarray(X, jnp.float32)
  _checks.check_key("key", key)
  return _sample(key, jnp.asarray(idx), jnp.asarray(noise_std, jnp.float32), x_std, X,
                 batch=batch, d=d, n=n, s=s)


@functools.partial(jax.jit, static_argnames=("batch", "d", "n", "s"))
def _sample(key, idx, noise_std, x_std, X_fixed, *, batch, d, n, s):
  k_support, k_normal = jax.random.split(key)
  k = idx.shape[0]
  # A uniformly random S-subset of the prior: the S smallest of k i.i.d. uniforms.
  ranks = jax.random.uniform(k_support, (batch, k))
  chosen = jnp.argsort(ranks, axis=1)[:, :s]
  coords = idx[chosen]
  # One normal draw for everything, sliced: each random call costs about a second of XLA compile
  # on CPU, which dominates short jobs and the test suite.
  z = jax.random.normal(k_normal, (batch, s + n * d + d + n + 1))
  values, z = z[:, :s], z[:, s:]
  X_rand, z = z[:, :n * d].reshape(batch, n, d), z[:, n * d:]
  x_query, noise = z[:, :d] * x_std, z[:, d:] * noise_std
  # A one-hot sum rather than a scatter: the coordinates are distinct, so this is exact, and it
  # stays instance-local when the batch is split over devices (a scatter's indices are not known
  # to be, so XLA would all-gather the batch on every device every step).
  beta = jnp.einsum("bsd,bs->bd", jax.nn.one_hot(coords, d, dtype=jnp.float32), values)
  X = X_rand * x_std if X_fixed is None else jnp.broadcast_to(X_fixed, (batch, n, d))
  y = jnp.einsum("bnd,bd->bn", X, beta) + noise[:, :n]
  y_query = jnp.einsum("bd,bd->b", x_query, beta) + noise[:, n]
  return Task(X, y, x_query, y_query, beta)
