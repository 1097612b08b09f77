"""Classical LASSO solvers (paper section 4.2): ISTA, FISTA and a converged reference.

All solve, for one instance X (n, d), y (n,):
    minimize_beta  (1/2) ||y - X beta||^2 + lam ||beta||_1            (section 4.1)
with beta^(1) = 0 and step 1/L, L the largest eigenvalue of X^T X. Batch with `jax.vmap`:
every instance may have its own X.
"""
from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from l2o_jax import _checks
from l2o_jax.ops import soft_threshold
from l2o_jax.tasks import support_indices


def lipschitz(X) -> jax.Array:
  """L = lambda_max(X^T X), computed on the smaller Gram matrix (n x n or d x d)."""
  n, d = X.shape
  gram = X @ X.T if n <= d else X.T @ X
  L = jnp.linalg.eigvalsh(gram)[-1]
  # An all-zero X has L = 0; any positive step is then exact, so avoid dividing by zero.
  return jnp.maximum(L, jnp.finfo(X.dtype).tiny)


def _check(X, y, lam, num_iters=None):
  _checks.check_instance(X, y)
  if _checks.shape_of("lam", lam) != ():
    raise ValueError(f"lam: expected a scalar, got shape {_checks.shape_of('lam', lam)}")
  _checks.check_nonnegative("lam", lam)
  if num_iters is not None:
    _checks.check_positive_int("num_iters", num_iters)


def ista(X, y, lam, num_iters: int, *, return_trajectory: bool = False):
  """ISTA: beta^(k+1) = S_{lam/L}(beta^(k) - (1/L) X^T (X beta^(k) - y))  (section 4.2).

  Returns beta^(num_iters + 1), shape (d,); with `return_trajectory=True` the iterates
  beta^(2), ..., beta^(num_iters + 1) as (num_iters, d).
  """
  _check(X, y, lam, num_iters)
  return _ista(X, y, lam, num_iters=num_iters, trajectory=return_trajectory)


def fista(X, y, lam, num_iters: int, *, return_trajectory: bool = False):
  """FISTA (Beck & Teboulle 2009): ISTA steps taken from an extrapolated point.

  t_1 = 1, z^(1) = beta^(1) = 0; beta^(k+1) = S_{lam/L}(z^(k) - (1/L) X^T (X z^(k) - y));
  t_{k+1} = (1 + sqrt(1 + 4 t_k^2)) / 2; z^(k+1) = beta^(k+1) + ((t_k - 1)/t_{k+1})(beta^(k+1) - beta^(k)).
  Same returns as `ista`.
  """
  _check(X, y, lam, num_iters)
  return _fista(X, y, lam, num_iters=num_iters, trajectory=return_trajectory)


@functools.partial(jax.jit, static_argnames=("num_iters", "trajectory"))
def _ista(X, y, lam, *, num_iters, trajectory):
  L = lipschitz(X)
  Xty = X.T @ y

  def step(beta, _):
    beta = soft_threshold(beta - (X.T @ (X @ beta) - Xty) / L, lam / L)
    return beta, beta

  beta, traj = lax.scan(step, jnp.zeros(X.shape[1], X.dtype), length=num_iters)
  return traj if trajectory else beta


@functools.partial(jax.jit, static_argnames=("num_iters", "trajectory"))
def _fista(X, y, lam, *, num_iters, trajectory):
  L = lipschitz(X)
  Xty = X.T @ y

  def step(carry, _):
    beta, z, t = carry
    beta_next = soft_threshold(z - (X.T @ (X @ z) - Xty) / L, lam / L)
    t_next = (1.0 + jnp.sqrt(1.0 + 4.0 * t * t)) / 2.0
    z = beta_next + ((t - 1.0) / t_next) * (beta_next - beta)
    return (beta_next, z, t_next), beta_next

  zero = jnp.zeros(X.shape[1], X.dtype)
  (beta, _, _), traj = lax.scan(step, (zero, zero, jnp.ones((), X.dtype)), length=num_iters)
  return traj if trajectory else beta


def lasso_objective(X, y, beta, lam):
  """(1/2)||y - X beta||^2 + lam ||beta||_1."""
  r = y - X @ beta
  return 0.5 * r @ r + lam * jnp.sum(jnp.abs(beta))


def duality_gap(X, y, beta, lam):
  """LASSO duality gap at beta, using the dual point nu = s r with r = y - X beta and
  s = min(1, lam / ||X^T r||_inf) (feasible: ||X^T nu||_inf <= lam).

  Written as 0.5 (1 - s)^2 ||r||^2 + sum_i (lam |beta_i| - s beta_i [X^T r]_i), which equals
  P(beta) - D(nu) exactly but avoids cancelling two large objective values.
  """
  r = y - X @ beta
  g = X.T @ r
  gmax = jnp.max(jnp.abs(g))
  s = jnp.minimum(1.0, lam / jnp.maximum(gmax, jnp.finfo(X.dtype).tiny))
  return 0.5 * (1.0 - s) ** 2 * (r @ r) + jnp.sum(lam * jnp.abs(beta) - s * beta * g)


class LassoInfo(NamedTuple):
  beta: jax.Array       # (d,) solution
  gap: jax.Array        # duality gap at beta (absolute)
  num_iters: jax.Array  # iterations used
  converged: jax.Array  # gap <= tol * max(1, (1/2)||y||^2)


def lasso(X, y, lam, tol: float | None = None, *, max_iters: int = 20000, check_every: int = 10,
          return_info: bool = False):
  """LASSO solved to convergence: a duality-gap-certified reference ("converged LASSO").

  FISTA with adaptive (gradient) restart (O'Donoghue & Candes 2015) in a `lax.while_loop`,
  stopping once duality_gap(beta) <= tol * max(1, (1/2)||y||^2) -- a relative gap, with
  (1/2)||y||^2 the objective at beta = 0 -- or after `max_iters`. The default tol is 1e-5 for
  float32 inputs (the gap's float32 round-off floor is about 1e-6 relative: measured on 4096
  paper-setting tasks, 18 of them never certify 1e-6) and 1e-10 for float64 inputs
  (`with jax.enable_x64():`), which is what the scikit-learn comparison uses.

  Returns beta (d,), or a `LassoInfo` with the certificate when `return_info=True`.
  Vmappable, but a vmapped batch iterates until its slowest instance converges: for large
  batches use `lasso_batch`, which drops converged instances between rounds.
  """
  _check(X, y, lam)
  tol = _tol_for(X, tol)
  _checks.check_positive_int("max_iters", max_iters)
  _checks.check_positive_int("check_every", check_every)
  info = _lasso(X, y, lam, tol=tol, max_iters=max_iters, check_every=check_every)
  return info if return_info else info.beta


def _tol_for(X, tol):
  if tol is None:
    tol = 1e-10 if jnp.result_type(X) == jnp.float64 else 1e-5
  if not tol > 0:
    raise ValueError(f"tol: expected a positive float, got {tol}")
  return float(tol)


def _lasso_run(X, y, lam, carry, it, gap, limit, threshold, check_every):
  """FISTA-with-restart iterations on one instance from `carry` = (beta, z, t) until the gap
  meets `threshold` or `it` reaches `limit` (checked every `check_every` iterations)."""
  L = lipschitz(X)
  Xty = X.T @ y

  def fista_step(carry, _):
    beta, z, t = carry
    beta_next = soft_threshold(z - (X.T @ (X @ z) - Xty) / L, lam / L)
    # Gradient restart: drop momentum when it points uphill.
    restart = jnp.dot(z - beta_next, beta_next - beta) > 0
    t = jnp.where(restart, 1.0, t)
    t_next = (1.0 + jnp.sqrt(1.0 + 4.0 * t * t)) / 2.0
    z = beta_next + ((t - 1.0) / t_next) * (beta_next - beta)
    return (beta_next, z, t_next), None

  def cond(state):
    _, it, gap = state
    return (gap > threshold) & (it < limit)

  def body(state):
    carry, it, _ = state
    carry, _ = lax.scan(fista_step, carry, length=check_every)
    return carry, it + check_every, duality_gap(X, y, carry[0], lam)

  return lax.while_loop(cond, body, (carry, it, gap))


def _lasso_start(X, y, lam):
  zero = jnp.zeros(X.shape[1], X.dtype)
  return (zero, zero, jnp.ones((), X.dtype)), jnp.zeros((), jnp.int32), duality_gap(X, y, zero, lam)


def _gap_threshold(y, tol):
  return tol * jnp.maximum(1.0, 0.5 * (y @ y))


@functools.partial(jax.jit, static_argnames=("tol", "max_iters", "check_every"))
def _lasso(X, y, lam, *, tol, max_iters, check_every):
  threshold = _gap_threshold(y, tol)
  carry, it, gap = _lasso_start(X, y, lam)
  (beta, _, _), iters, gap = _lasso_run(X, y, lam, carry, it, gap, max_iters, threshold, check_every)
  return LassoInfo(beta, gap, iters, gap <= threshold)


@functools.partial(jax.jit, static_argnames=("tol",))
def _lasso_batch_start(X, y, lam, *, tol):
  carry, it, gap = jax.vmap(_lasso_start, in_axes=(0, 0, None))(X, y, lam)
  return carry, it, gap, jax.vmap(_gap_threshold, in_axes=(0, None))(y, tol)


@functools.partial(jax.jit, static_argnames=("check_every", "chunk"))
def _lasso_batch_round(X, y, lam, carry, it, gap, limit, threshold, *, check_every, chunk):
  run = lambda args: _lasso_run(args[0], args[1], lam, args[2], args[3], args[4], limit, args[5],
                                check_every)
  # lax.map over cache-sized chunks: a vmapped iteration over the whole batch streams all of X
  # from memory every step (memory-bound), while a chunk's X stays in cache for all its steps.
  return lax.map(run, (X, y, carry, it, gap, threshold), batch_size=min(chunk, X.shape[0]))


def lasso_batch(X, y, lam, tol: float | None = None, *, max_iters: int = 20000, check_every: int = 10,
                first_round: int = 100, chunk: int = 256) -> LassoInfo:
  """Converged LASSO for a whole batch X (B, n, d), y (B, n): `lasso` without the straggler cost.

  `jax.vmap(lasso)` keeps iterating every instance until the slowest converges (on the paper's
  setting the median instance needs ~25x fewer iterations than the slowest). Here the batch runs
  in rounds of doubling length (first_round, 2 first_round, ...); after each round the host
  drops the certified instances and the rest continue, compacted into a power-of-two bucket (so
  at most ~log2(B) shapes compile). Within a round, instances run in vmapped chunks of `chunk`
  so each chunk's matrices stay in cache. Same iterations, stopping rule and certificate as
  `lasso`; returns a batched `LassoInfo`.
  """
  Bshape = _checks.check_ndim("X", X, 3, "(B, n, d): a batch of measurement matrices")
  yshape = _checks.check_ndim("y", y, 2, f"(B, n) = {Bshape[:2]}")
  if yshape != Bshape[:2]:
    raise ValueError(f"y: expected shape {Bshape[:2]} to match X {Bshape}, got {yshape}")
  if _checks.shape_of("lam", lam) != ():
    raise ValueError(f"lam: expected a scalar, got shape {_checks.shape_of('lam', lam)}")
  _checks.check_nonnegative("lam", lam)
  tol = _tol_for(X, tol)
  _checks.check_positive_int("max_iters", max_iters)
  _checks.check_positive_int("check_every", check_every)
  _checks.check_positive_int("first_round", first_round)
  _checks.check_positive_int("chunk", chunk)
  X, y = jnp.asarray(X), jnp.asarray(y)
  lam = jnp.asarray(lam, X.dtype)
  carry, it, gap, threshold = _lasso_batch_start(X, y, lam, tol=tol)
  state = jax.tree_util.tree_map(np.array, (carry, it, gap))
  threshold = np.asarray(threshold)
  active = np.arange(X.shape[0])
  limit = 0
  round_len = first_round
  while active.size and limit < max_iters:
    limit = min(limit + round_len, max_iters)
    # Pad the active set to a power of two by repeating its first entry (results discarded).
    bucket = active.size if active.size == X.shape[0] else 1 << (active.size - 1).bit_length()
    idx = np.concatenate([active, np.full(bucket - active.size, active[0])])
    sub = jax.tree_util.tree_map(lambda a: a[idx], state)
    out = _lasso_batch_round(X[idx], y[idx], lam, *sub, jnp.asarray(limit, jnp.int32), threshold[idx],
                             check_every=check_every, chunk=chunk)
    out = jax.tree_util.tree_map(np.asarray, out)
    for dst, src in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(out)):
      dst[active] = src[:active.size]
    _, it_all, gap_all = state
    active = active[gap_all[active] > threshold[active]]
    round_len *= 2
  (beta, _, _), iters, gap = state
  return LassoInfo(jnp.asarray(beta), jnp.asarray(gap), jnp.asarray(iters), jnp.asarray(gap <= threshold))


def best_subset(X, y, s: int, support=None):
  """Exhaustive-support oracle: least squares on every S-subset of the support prior, keeping
  the subset with the smallest residual (best-subset selection, the L0 problem LASSO relaxes).

  A reference, not a practical solver: C(|support|, S) least-squares solves per instance
  (1140 for the paper's d = 20, S = 3). With noiseless data and n >= S it recovers beta* exactly
  whenever the S-sparse solution is unique; with n < S it returns one of many interpolants.
  """
  n, d = _checks.check_instance(X, y)
  s = _checks.check_positive_int("s", s)
  idx = support_indices(support, d, s)
  subsets = np.array(list(itertools.combinations(idx.tolist(), s)), np.int32)
  return _best_subset(X, y, jnp.asarray(subsets))


@jax.jit
def _best_subset(X, y, subsets):
  def solve(cols):
    A = X[:, cols]
    coef = jnp.linalg.pinv(A) @ y
    r = y - A @ coef
    return r @ r, coef

  res, coefs = jax.vmap(solve)(subsets)
  best = jnp.argmin(res)
  return jnp.zeros(X.shape[1], X.dtype).at[subsets[best]].set(coefs[best])
