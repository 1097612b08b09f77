"""Read-out functions of section 4.3: linear (Definition 4.1), query (Definition 4.2) and
the query-dagger read-out with the parameters of the proof of Theorem 5.2 (Corollary E.1).

Every read-out returns N+1 predictions from the x-only tokens: y_hat_i is read at token 2i-1
(1-indexed), which holds x_i and has seen the i-1 demonstrations before it, so y_hat_{N+1}
(token 2N+1, the query) is the in-context prediction and y_hat_i (i <= N) is the prediction
with i-1 demonstrations. (Definition 4.2's index floor((i'+1)/2) for token i' = 2i-1 is i,
i.e. the query read-out multiplies token 2i-1 by its own x_i.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from l2o_jax import _checks
from l2o_jax.transformer.embedding import beta_rows, dim_from_D


def _check_H(H_out) -> tuple[int, int, int]:
  D, T = _checks.check_ndim("H_out", H_out, 2, "(D, 2N+1) with tokens as columns")
  d = dim_from_D(D)
  if T % 2 == 0:
    raise ValueError(f"H_out: expected an odd number of tokens 2N+1 (eq. 4.2), got {T}")
  return D, (T - 1) // 2, d


def _check_X_tilde(X_tilde, N: int, d: int) -> None:
  shape = _checks.check_ndim("X_tilde", X_tilde, 2, f"(N+1, d) = ({N + 1}, {d}), [X; x_query]")
  if shape != (N + 1, d):
    raise ValueError(f"X_tilde: expected shape (N+1, d) = ({N + 1}, {d}) for H_out with "
                     f"{2 * N + 1} tokens, got {shape}")


def x_tilde(X, x_query) -> jax.Array:
  """X_tilde = [X; x_{N+1}^T], (N+1, d) (Definition 4.2).  X: (N, d); x_query: (d,)."""
  _, d = _checks.check_ndim("X", X, 2, "(N, d) demonstrations as rows")
  if _checks.shape_of("x_query", x_query) != (d,):
    raise ValueError(f"x_query: expected shape ({d},) to match X's {d} columns, got "
                     f"{_checks.shape_of('x_query', x_query)}")
  X, x_query = _checks.as_float(X, x_query)
  return jnp.concatenate([X, x_query[None]], axis=0)


def linear_readout(v, H_out) -> jax.Array:
  """Definition 4.1: y_hat_i = v^T h_{2i-1}, i = 1..N+1.  v: (D,); H_out: (D, 2N+1)."""
  D, _, _ = _check_H(H_out)
  if _checks.shape_of("v", v) != (D,):
    raise ValueError(f"v: expected shape ({D},) to match H_out's {D} rows, got {_checks.shape_of('v', v)}")
  return _linear(*_checks.as_float(v, H_out))


def _linear(v, H_out):
  return H_out[:, 0::2].T @ v


def query_readout(V, H_out, X_tilde) -> jax.Array:
  """Definition 4.2: y_hat_i = h_{2i-1}^T V x_i, i = 1..N+1 (x_{N+1} the query).

  V: (D, d); H_out: (D, 2N+1); X_tilde: (N+1, d) = [X; x_query].
  """
  D, N, d = _check_H(H_out)
  if _checks.shape_of("V", V) != (D, d):
    raise ValueError(f"V: expected shape (D, d) = ({D}, {d}), got {_checks.shape_of('V', V)}")
  _check_X_tilde(X_tilde, N, d)
  return _query(*_checks.as_float(V, H_out, X_tilde))


def _query(V, H_out, X_tilde):
  return jnp.einsum("ti,ij,tj->t", H_out[:, 0::2].T, V, X_tilde)


def query_dagger_matrix(d: int, dtype=jnp.float32) -> jax.Array:
  """V^dagger = [0_{(d+1) x d}; I_d; 0_{1 x d}], the read-out of Corollary E.1's proof."""
  d = _checks.check_positive_int("d", d)
  return jnp.zeros((2 * d + 2, d), dtype).at[beta_rows(d)].set(jnp.eye(d, dtype=dtype))


def query_dagger_readout(H_out, X_tilde) -> jax.Array:
  """Query-dagger read-out: Definition 4.2 with V fixed to `query_dagger_matrix(d)`, the choice
  in the proof of Theorem 5.2 (Corollary E.1), so y_hat_i = x_i^T beta_{2i-1}: the label
  predicted from the beta slot. It has no trainable parameters; a Small TF trained with it
  must put its estimate of beta* in the beta slot (Figure 1c, "Query Readout+").
  """
  _, N, d = _check_H(H_out)
  _check_X_tilde(X_tilde, N, d)
  return _query_dagger(*_checks.as_float(H_out, X_tilde))


def _query_dagger(H_out, X_tilde):
  d = X_tilde.shape[1]
  return jnp.einsum("tj,tj->t", H_out[beta_rows(d), 0::2].T, X_tilde)
