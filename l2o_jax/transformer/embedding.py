"""The input embedding of eq. 4.2 / C.4 and the layout of its 2d + 2 rows.

One instance (X (N, d), y (N,), x_{N+1} (d,)) becomes H in R^{(2d+2) x (2N+1)}, tokens as
columns (the paper's convention, as in `l2o_jax.ops`):

    column 2i - 1 (1-indexed), i = 1..N+1:  [x_i; 0;   beta; 1]   (x-only token; x_{N+1} = query)
    column 2i,                 i = 1..N:    [x_i; y_i; beta; 0]   (demonstration token)

Rows (0-indexed): 0..d-1 the x slot, d the y slot, d+1..2d the beta slot (the paper's
"implicit parameter vectors", initialised to 0), 2d+1 the indicator. The beta slot of the
x-only token 2n+1 is where the constructed Transformer keeps its n-demonstration LISTA-VM
iterate (Theorem 4.1).
"""
from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from l2o_jax import _checks


def model_dim(d: int) -> int:
  """D = 2d + 2, the token width of eq. 4.2."""
  return 2 * d + 2


def y_row(d: int) -> int:
  return d


def beta_rows(d: int) -> slice:
  return slice(d + 1, 2 * d + 1)


def indicator_row(d: int) -> int:
  return 2 * d + 1


def dim_from_D(D: int) -> int:
  """Inverse of `model_dim`; rejects widths that are not 2d + 2."""
  if D < 4 or D % 2:
    raise ValueError(f"H: expected 2d + 2 rows (eq. 4.2) with d >= 1, got {D} rows")
  return (D - 2) // 2


def embed(X, y, x_query) -> jax.Array:
  """H^(1) of eq. 4.2: (2d+2, 2N+1) with the beta slots at zero.

  Args:
    X: (N, d) demonstrations x_1..x_N as rows (N may be 0).
    y: (N,) their labels.
    x_query: (d,) the query x_{N+1}.
  """
  N, d = _checks.check_instance(X, y)
  if d == 0:
    raise ValueError(f"X: expected d >= 1 columns (eq. 4.2 has 2d + 2 rows), got shape {(N, d)}")
  q = _checks.check_ndim("x_query", x_query, 1, f"(d,) = ({d},)")
  if q != (d,):
    raise ValueError(f"x_query: expected shape ({d},) to match X's {d} columns, got {q}")
  return _embed(*_checks.as_float(X, y, x_query))


def _embed(X, y, x_query):
  N, d = X.shape
  dtype = jnp.result_type(X, y, x_query, jnp.float32)
  T = 2 * N + 1
  # Each x_i appears twice (x-only token, then the (x_i, y_i) token); the query closes the prompt.
  xs = jnp.concatenate([jnp.repeat(X.astype(dtype), 2, axis=0), x_query[None].astype(dtype)], axis=0)
  ys = jnp.zeros((T,), dtype).at[1::2].set(y.astype(dtype))
  indicator = (jnp.arange(T) % 2 == 0).astype(dtype)
  beta = jnp.zeros((T, d), dtype)
  return jnp.concatenate([xs, ys[:, None], beta, indicator[:, None]], axis=1).T


def beta_slot(H, n=None) -> jax.Array:
  """The beta slot of token 2n+1 (1-indexed): the estimate that has seen n demonstrations.

  Args:
    H: (D, 2N+1) a sequence, or (K, D, 2N+1) every block's output (`return_all=True`).
    n: 0..N, or None for every x-only token.
  Returns:
    (..., d) for an int n; (..., N+1, d) (row n = n demonstrations) for n=None.
  """
  shape = _checks.shape_of("H", H)
  if len(shape) not in (2, 3):
    raise ValueError(f"H: expected (D, 2N+1) or (K, D, 2N+1), got shape {shape}")
  D, T = shape[-2:]
  d = dim_from_D(D)
  if T % 2 == 0:
    raise ValueError(f"H: expected an odd number of tokens 2N+1 (eq. 4.2), got {T}")
  N = (T - 1) // 2
  rows = jnp.asarray(H)[..., beta_rows(d), :]
  if n is None:
    return jnp.swapaxes(rows[..., 0::2], -1, -2)
  if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 0 <= n <= N:
    raise ValueError(f"n: expected an int in [0, {N}] (demonstrations seen by token 2n+1), got {n!r}")
  return rows[..., 2 * n]
