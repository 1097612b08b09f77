"""Classical LASSO solvers (paper section 4.2): ISTA, FISTA and a converged reference.

All solve, for one instance X (n, d), y (n,):
    minimize_beta  (1/2) ||y - X beta||^2 + lam ||beta||_1            (section 4.1)
ISTA and FISTA start from beta^(1) = 0 with step 1/L, L the largest eigenvalue of X^T X. Batch
with `jax.vmap`: every instance may have its own X. `lasso` is the duality-gap-certified
reference (FISTA with restart); `lasso_batch` solves a whole batch to the same certificate, by
default with the LASSO homotopy (LARS-LASSO), which is exact after a few path steps.
"""
from __future__ import annotations

import functools
import itertools
import math
import numbers
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
  n, d = _checks.check_ndim("X", X, 2, "(n, d) for a single instance; vmap over a batch")
  X = jnp.asarray(X)
  X = X.astype(_checks.float_dtype(X))
  if n == 0 or d == 0:   # no measurements (or no unknowns): X^T X = 0
    return jnp.asarray(jnp.finfo(X.dtype).tiny, X.dtype)
  gram = X @ X.T if n <= d else X.T @ X
  L = jnp.linalg.eigvalsh(gram)[-1]
  # An all-zero X has L = 0; any positive step is then exact, so avoid dividing by zero.
  return jnp.maximum(L, jnp.finfo(X.dtype).tiny)


def _check(X, y, lam, num_iters=None):
  """Validates one instance and returns (X, y, lam) in one floating dtype (`_checks.float_dtype`),
  so integer data and mixed float32 / float64 inputs give one scan-carry type."""
  _checks.check_instance(X, y)
  if _checks.shape_of("lam", lam) != ():
    raise ValueError(f"lam: expected a scalar, got shape {_checks.shape_of('lam', lam)}")
  _checks.check_nonnegative("lam", lam)
  if num_iters is not None:
    _checks.check_positive_int("num_iters", num_iters)
  dtype = _checks.float_dtype(X, y)
  return jnp.asarray(X, dtype), jnp.asarray(y, dtype), jnp.asarray(lam, dtype)


def ista(X, y, lam, num_iters: int, *, return_trajectory: bool = False):
  """ISTA: beta^(k+1) = S_{lam/L}(beta^(k) - (1/L) X^T (X beta^(k) - y))  (section 4.2).

  Returns beta^(num_iters + 1), shape (d,); with `return_trajectory=True` the iterates
  beta^(2), ..., beta^(num_iters + 1) as (num_iters, d). Differentiable in X, y and lam (so lam
  may be traced or vmapped); num_iters is static.
  """
  X, y, lam = _check(X, y, lam, num_iters)
  return _ista(X, y, lam, num_iters=num_iters, trajectory=return_trajectory)


def fista(X, y, lam, num_iters: int, *, return_trajectory: bool = False):
  """FISTA (Beck & Teboulle 2009): ISTA steps taken from an extrapolated point.

  t_1 = 1, z^(1) = beta^(1) = 0; beta^(k+1) = S_{lam/L}(z^(k) - (1/L) X^T (X z^(k) - y));
  t_{k+1} = (1 + sqrt(1 + 4 t_k^2)) / 2; z^(k+1) = beta^(k+1) + ((t_k - 1)/t_{k+1})(beta^(k+1) - beta^(k)).
  Same returns as `ista`.
  """
  X, y, lam = _check(X, y, lam, num_iters)
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


def _check_beta(X, y, beta, lam):
  n, d = _checks.check_instance(X, y)
  b = _checks.shape_of("beta", beta)
  if b != (d,):
    raise ValueError(f"beta: expected shape (d,) = ({d},) to match X's {d} columns, got {b}")
  if _checks.shape_of("lam", lam) != ():
    raise ValueError(f"lam: expected a scalar, got shape {_checks.shape_of('lam', lam)}")
  _checks.check_nonnegative("lam", lam)   # as lasso: a negative lam is no LASSO (nor its dual)
  dtype = _checks.float_dtype(X, y, beta)
  return jnp.asarray(X, dtype), jnp.asarray(y, dtype), jnp.asarray(beta, dtype), jnp.asarray(lam, dtype)


def lasso_objective(X, y, beta, lam):
  """(1/2)||y - X beta||^2 + lam ||beta||_1 for one instance: X (n, d), y (n,), beta (d,)."""
  return _lasso_objective(*_check_beta(X, y, beta, lam))


def _lasso_objective(X, y, beta, lam):
  r = y - X @ beta
  return 0.5 * r @ r + lam * jnp.sum(jnp.abs(beta))


def duality_gap(X, y, beta, lam):
  """LASSO duality gap at beta, an upper bound on P(beta) - min P (P the objective above).

  The dual point, with r = y - X beta: for lam > 0, nu = s r with s = min(1, lam / ||X^T r||_inf)
  (feasible: ||X^T nu||_inf <= lam), and the gap is written as
  0.5 (1 - s)^2 ||r||^2 + sum_i (lam |beta_i| - s beta_i [X^T r]_i), which equals P(beta) - D(nu)
  exactly but avoids cancelling two large objective values. At lam = 0 (least squares) that
  point degenerates to nu = 0, which certifies nothing unless r = 0; there nu = (I - P_X) r, the
  residual's part orthogonal to X's column space (X^T nu = 0), and the gap is
  0.5 ||P_X r||^2, exactly P(beta) - min P (P_X from an SVD of X; directions with singular
  values below numpy.linalg.lstsq's cutoff count as outside the column space).
  One instance: X (n, d), y (n,), beta (d,), lam >= 0 a scalar.
  """
  X, y, beta, lam = _check_beta(X, y, beta, lam)
  return _duality_gap(X, y, beta, lam, _ls_basis(X, lam))


def _ls_basis(X, lam):
  """U (n, min(n, d)) with U U^T = P_X, the projector onto X's column space, at lam = 0: the left
  singular vectors of X, those whose singular value is at most max(n, d) eps sigma_max
  (numpy.linalg.lstsq's rcond) zeroed. Zeros when lam != 0, where `_duality_gap` does not use it;
  the SVD then does not run (lax.cond; both branches run only if lam is vmapped)."""
  n, d = X.shape
  k = min(n, d)
  if k == 0:
    return jnp.zeros((n, 0), X.dtype)

  def basis(X):
    U, S, _ = jnp.linalg.svd(X, full_matrices=False)
    return U * (S > max(n, d) * jnp.finfo(X.dtype).eps * S[0])

  return lax.cond(lam == 0, basis, lambda X: jnp.zeros((n, k), X.dtype), X)


def _duality_gap(X, y, beta, lam, U):
  """`duality_gap` with U = _ls_basis(X, lam)."""
  r = y - X @ beta
  g = X.T @ r
  gmax = jnp.max(jnp.abs(g), initial=0.0)   # initial: d = 0 has no entries
  s = jnp.minimum(1.0, lam / jnp.maximum(gmax, jnp.finfo(X.dtype).tiny))
  # At lam = 0, s = 0 and the dual point is (I - P_X) r: ||r||^2 becomes ||P_X r||^2 = ||U^T r||^2.
  p = U.T @ r
  rr = jnp.where(lam == 0, p @ p, r @ r)
  return 0.5 * (1.0 - s) ** 2 * rr + jnp.sum(lam * jnp.abs(beta) - s * beta * g)


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
  (`with jax.enable_x64():`), which is what the scikit-learn comparison uses. At lam = 0 (least
  squares) the gap is the exact suboptimality (1/2)||P_X r||^2 (`duality_gap`), so a nonzero
  optimal residual (noisy data, n > d) certifies too.

  Returns beta (d,), or a `LassoInfo` with the certificate when `return_info=True`.
  Jittable and vmappable (also over lam; a traced negative lam is never reported converged), but
  a vmapped batch iterates until its slowest instance converges: for large batches use
  `lasso_batch`, which drops converged instances between rounds.

  Differentiable in X, y and lam (`jax.grad`, `jax.jacfwd`, under vmap) by implicit
  differentiation of the LASSO optimality conditions at the returned beta, not by unrolling the
  iterations: on the support S = {j : beta_j != 0},
      X_S^T (X_S beta_S - y) + lam sign(beta_S) = 0,  beta_{S^c} = 0,
  so dbeta_S = (X_S^T X_S)^{-1} (dX_S^T r + X_S^T (dy - dX beta) - dlam sign(beta_S)) with
  r = y - X beta, and dbeta_{S^c} = 0 (`_lasso_solution`). This is the derivative of the exact
  solution wherever its support and signs are locally constant (almost every (X, y, lam)); it
  needs X_S of full column rank (unique solutions do) and is accurate to the certificate's tol.
  The `LassoInfo` certificate fields (gap, num_iters, converged) carry no derivative.
  `lasso_batch` (a host driver) is not differentiable.
  """
  X, y, lam = _check(X, y, lam)
  tol = _tol_for(X.dtype, tol)
  _checks.check_positive_int("max_iters", max_iters)
  _checks.check_positive_int("check_every", check_every)
  info = _lasso(X, y, lam, tol=tol, max_iters=max_iters, check_every=check_every)
  return info if return_info else info.beta


def lasso_implicit(X, y, lam, beta):
  """Returns `beta`, a LASSO solution for (X, y, lam), with `lasso`'s implicit derivative in X, y
  and lam attached (see `lasso`; `beta` itself is treated as a function of them).

  For solutions computed elsewhere, e.g. by `lasso_batch` (a host driver, not traceable):
      info = lasso_batch(X, y, lam)
      loss = lambda X, y: f(jax.vmap(lasso_implicit, (0, 0, None, 0))(X, y, lam, info.beta))
  `jax.grad(loss)` then differentiates the exact solution map. Meaningful only at a solution
  (certified by `duality_gap`); one instance X (n, d), y (n,), beta (d,), lam >= 0; vmap for batches.
  """
  X, y, beta, lam = _check_beta(X, y, beta, lam)
  _checks.check_nonnegative("lam", lam)
  return _lasso_solution(X, y, lam, beta)


@jax.custom_jvp
def _lasso_solution(X, y, lam, beta):
  """Returns `beta`, the LASSO solution for (X, y, lam); its derivative is the implicit one of
  `lasso`'s docstring (the tangent of `beta` itself is ignored: it is a function of the others)."""
  return beta


@_lasso_solution.defjvp
def _lasso_solution_jvp(primals, tangents):
  X, y, lam, beta = primals
  dX, dy, dlam, _ = tangents
  on = (beta != 0).astype(X.dtype)
  # X_S^T X_S on the support, the identity off it: the solve gives dbeta_j = 0 for j not in S.
  A = (X.T @ X) * (on[:, None] * on[None, :]) + jnp.diag(1.0 - on)
  r = y - X @ beta
  rhs = on * (dX.T @ r + X.T @ (dy - dX @ beta) - dlam * jnp.sign(beta))
  return beta, jnp.linalg.solve(A, rhs)


def _tol_for(dtype, tol):
  if tol is None:
    tol = 1e-10 if dtype == jnp.float64 else 1e-5
  # inf would certify beta = 0 after no iteration; True would silently mean 1.0.
  if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0 < tol < math.inf:
    raise ValueError(f"tol: expected a finite float > 0, got {tol!r}")
  return float(tol)


def _lasso_run(X, y, lam, U, carry, it, gap, limit, threshold, check_every):
  """FISTA-with-restart iterations on one instance from `carry` = (beta, z, t) until the gap
  meets `threshold` or `it` reaches `limit` (checked every `check_every` iterations; a last block
  that would pass `limit` stops at it, so at most `limit` iterations run). U: `_ls_basis`."""
  L = lipschitz(X)
  Xty = X.T @ y

  def fista_step(carry, k):
    beta, z, t = carry
    beta_next = soft_threshold(z - (X.T @ (X @ z) - Xty) / L, lam / L)
    # Gradient restart: drop momentum when it points uphill.
    restart = jnp.dot(z - beta_next, beta_next - beta) > 0
    t = jnp.where(restart, 1.0, t)
    t_next = (1.0 + jnp.sqrt(1.0 + 4.0 * t * t)) / 2.0
    z = beta_next + ((t - 1.0) / t_next) * (beta_next - beta)
    new = (beta_next, z, t_next)
    return jax.tree_util.tree_map(lambda a, b: jnp.where(k < limit, a, b), new, carry), None

  def cond(state):
    _, it, gap = state
    return (gap > threshold) & (it < limit)

  def body(state):
    carry, it, _ = state
    carry, _ = lax.scan(fista_step, carry, it + jnp.arange(check_every, dtype=it.dtype))
    return carry, jnp.minimum(it + check_every, limit), _duality_gap(X, y, carry[0], lam, U)

  return lax.while_loop(cond, body, (carry, it, gap))


def _lasso_start(X, y, lam, U):
  zero = jnp.zeros(X.shape[1], X.dtype)
  return (zero, zero, jnp.ones((), X.dtype)), jnp.zeros((), jnp.int32), _duality_gap(X, y, zero, lam, U)


def _gap_threshold(y, tol):
  return tol * jnp.maximum(1.0, 0.5 * (y @ y))


@functools.partial(jax.jit, static_argnames=("tol", "max_iters", "check_every"))
def _lasso(X, y, lam, *, tol, max_iters, check_every):
  # The iterations see no tangents (they are not differentiated); beta's derivative comes from
  # the optimality conditions at their result (`_lasso_solution`, inside the jit: no eager cost).
  Xs, ys, lams = (lax.stop_gradient(a) for a in (X, y, lam))
  threshold = _gap_threshold(ys, tol)
  U = _ls_basis(Xs, lams)
  carry, it, gap = _lasso_start(Xs, ys, lams, U)
  (beta, _, _), iters, gap = _lasso_run(Xs, ys, lams, U, carry, it, gap, max_iters, threshold, check_every)
  # lam < 0 is rejected up front when concrete; a traced one leaves a meaningless "gap".
  return LassoInfo(_lasso_solution(X, y, lam, beta), gap, iters, (gap <= threshold) & (lams >= 0))


@functools.partial(jax.jit, static_argnames=("tol",))
def _lasso_batch_start(X, y, lam, U, *, tol):
  carry, it, gap = jax.vmap(_lasso_start, in_axes=(0, 0, None, 0))(X, y, lam, U)
  return carry, it, gap, jax.vmap(_gap_threshold, in_axes=(0, None))(y, tol)


@jax.jit
def _ls_bases(X):
  """`_ls_basis` of every instance of X (B, n, d) at lam = 0."""
  return jax.vmap(_ls_basis, in_axes=(0, None))(X, jnp.zeros((), X.dtype))


def _batch_bases(X, lam):
  """Per-instance `_ls_basis` for lasso_batch's concrete lam: (B, n, 0), nothing to compute,
  unless lam = 0."""
  return _ls_bases(X) if float(lam) == 0 else jnp.zeros(X.shape[:2] + (0,), X.dtype)


@jax.jit
def _ls_gaps(X, y, beta):
  """`duality_gap` at lam = 0 of every instance of a batch."""
  return jax.vmap(lambda X, y, b, U: _duality_gap(X, y, b, jnp.zeros((), X.dtype), U))(X, y, beta, _ls_bases(X))


@functools.partial(jax.jit, static_argnames=("check_every", "chunk"))
def _lasso_batch_round(X, y, lam, U, carry, it, gap, limit, threshold, *, check_every, chunk):
  run = lambda args: _lasso_run(args[0], args[1], lam, args[2], args[3], args[4], args[5], limit, args[6],
                                check_every)
  # lax.map over cache-sized chunks: a vmapped iteration over the whole batch streams all of X
  # from memory every step (memory-bound), while a chunk's X stays in cache for all its steps.
  return lax.map(run, (X, y, U, carry, it, gap, threshold), batch_size=min(chunk, X.shape[0]))


def _fista_batch(X, y, lam, tol, *, max_iters, check_every, first_round, chunk):
  """FISTA-with-restart (`lasso`) on a batch, in rounds with host compaction (see lasso_batch)."""
  U = _batch_bases(X, lam)
  carry, it, gap, threshold = _lasso_batch_start(X, y, lam, U, tol=tol)
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
    out = _lasso_batch_round(X[idx], y[idx], lam, U[idx], *sub, jnp.asarray(limit, jnp.int32), threshold[idx],
                             check_every=check_every, chunk=chunk)
    out = jax.tree_util.tree_map(np.asarray, out)
    for dst, src in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(out)):
      dst[active] = src[:active.size]
    _, it_all, gap_all = state
    active = active[gap_all[active] > threshold[active]]
    round_len *= 2
  (beta, _, _), iters, gap = state
  return beta, gap, iters, threshold


# --- Homotopy (LARS-LASSO) ------------------------------------------------------------------
#
# Arrays inside the kernel are batch-LAST: a vector is (d, C), a matrix (p, q, C), so that every
# operation is a contiguous, vectorised loop over the C instances of a chunk, and small
# contractions (matrix-vector products, sums and minima over d) are unrolled into chains of
# (., C) slices. Two facts about XLA on CPU shape this code. Its reductions over a leading or
# middle axis compile to loops 10-20x slower than the unrolled chain (which also fuses with its
# neighbours). And its fusion pass re-computes a cheap producer inside every consumer that reads
# the producer's elements repeatedly -- a matrix-vector product feeding an outer product or another
# product would be recomputed d times over. Dividing by `one`, a runtime 1.0 (a jit argument, so
# it cannot be folded away), marks such a value as expensive to XLA, which then materialises it.


def _mv(M, v):
  """sum_k M[:, k] v[k]: M (p, q, C), v (q, C) -> (p, C)."""
  acc = M[:, 0] * v[0]
  for k in range(1, M.shape[1]):
    acc = acc + M[:, k] * v[k]
  return acc


def _mtv(M, v):
  """sum_i M[i] v[i]: M (p, q, C), v (p, C) -> (q, C)."""
  acc = M[0] * v[0]
  for i in range(1, M.shape[0]):
    acc = acc + M[i] * v[i]
  return acc


def _fold(op, x):
  """op-reduction over the leading axis of x, unrolled."""
  return functools.reduce(op, [x[k] for k in range(x.shape[0])])


def _first(hit, dtype):
  """Smallest k with hit[k] (hit.shape[0] where there is none), per instance, as a float of
  `dtype` (so that it can be materialised by a division)."""
  first = jnp.full(hit.shape[1:], hit.shape[0], dtype)
  for k in reversed(range(hit.shape[0])):
    first = jnp.where(hit[k], jnp.asarray(k, dtype), first)
  return first


class _PathState(NamedTuple):
  """Homotopy state, batch-last. The active set lives in m = min(n, d) slots (a LASSO solution in
  general position has at most n nonzeros): slot t holds variable idx[t] (d when free), its column
  Xs[:, t], sign ss[t] and coefficient bs[t]; Ks is the inverse of the slots' Gram matrix
  X_A^T X_A (identity on free slots). steps = 0 marks a fresh start (the rest is then ignored)."""
  lamc: jax.Array     # (C,) current path level: |X_j^T r| = lamc on the active set
  Xs: jax.Array       # (n, m, C)
  Ks: jax.Array       # (m, m, C)
  idx: jax.Array      # (m, C) int32
  ss: jax.Array       # (m, C)
  bs: jax.Array       # (m, C)
  done: jax.Array     # (C,) bool: reached lam
  fail: jax.Array     # (C,) bool: numerical breakdown (handed to FISTA)
  steps: jax.Array    # (C,) int32
  dropped: jax.Array  # (C,) int32: variable dropped at the last step (-1: none)


def _path_zero_state(n, d, C, dtype):
  m = min(n, d)
  return _PathState(lamc=np.zeros(C, dtype), Xs=np.zeros((n, m, C), dtype), Ks=np.zeros((m, m, C), dtype),
                    idx=np.zeros((m, C), np.int32), ss=np.zeros((m, C), dtype), bs=np.zeros((m, C), dtype),
                    done=np.zeros(C, bool), fail=np.zeros(C, bool), steps=np.zeros(C, np.int32),
                    dropped=np.zeros(C, np.int32))


def _path_resume(st, Xt, yt, xx, lam, one):
  """Correlations c = X^T r recomputed exactly (no drift is carried between rounds) and the
  active mask. A fresh instance (steps = 0) starts at the path's first kink: at lam0 =
  ||X^T y||_inf the argmax j0 enters with beta = 0 (one step); lam >= lam0 means beta = 0 is
  optimal and the instance is done."""
  n, d, C = Xt.shape
  m = st.Ks.shape[0]
  dt = Xt.dtype
  fresh = st.steps == 0
  c0 = _mtv(Xt, yt) / one
  lam0 = _fold(jnp.maximum, jnp.abs(c0)) / one
  start = fresh & (lam0 > lam)
  iod = lax.broadcasted_iota(jnp.int32, (d, C), 0)
  iom = lax.broadcasted_iota(jnp.int32, (m, C), 0)
  j0 = (_first(jnp.abs(c0) == lam0[None], dt) / one).astype(jnp.int32)
  e0 = (iod == j0[None]) & start[None]                                    # (d, C)
  x0 = _mv(Xt, e0.astype(dt)) / one                                       # column j0
  slot0 = (iom == 0) & start[None]                                        # (m, C)
  xx0 = _fold(jnp.add, jnp.where(e0, xx, 0))
  eye = (lax.broadcasted_iota(jnp.int32, (m, m, 1), 0) == lax.broadcasted_iota(jnp.int32, (m, m, 1), 1))
  Ks0 = jnp.where(slot0[:, None] & slot0[None, :], 1 / jnp.where(start, xx0, 1)[None, None], eye.astype(dt))
  idx = jnp.where(fresh[None], jnp.where(slot0, j0[None], d), st.idx)
  bs = jnp.where(fresh[None], 0, st.bs)
  Xs = jnp.where(fresh[None, None], jnp.where(slot0[None], x0[:, None], 0), st.Xs)
  c = jnp.where(fresh[None], c0, _mtv(Xt, (yt - _mv(Xs, bs)) / one)) / one
  active = _fold(jnp.logical_or, iod[None] == idx[:, None])
  sgn0 = _fold(jnp.add, jnp.where(e0, jnp.sign(c0), 0))
  st = _PathState(lamc=jnp.where(fresh, jnp.maximum(lam0, lam), st.lamc), Xs=Xs,
                  Ks=jnp.where(fresh[None, None], Ks0, st.Ks), idx=idx,
                  ss=jnp.where(fresh[None], jnp.where(slot0, sgn0[None], 0), st.ss), bs=bs,
                  done=jnp.where(fresh, ~start, st.done), fail=st.fail & ~fresh,
                  steps=jnp.where(start, 1, st.steps), dropped=jnp.where(fresh, -1, st.dropped))
  return st, c, active


def _path_step(carry, Xt, xx, lam, limit, one):
  """One homotopy step: follow the piecewise-linear solution path beta(lamc) down to the next
  kink -- a variable joins the active set, an active coefficient reaches zero and leaves, or the
  path reaches lam (done). Along a segment beta_A moves along w = (X_A^T X_A)^{-1} s_A and all
  correlations c = X^T r change at rate a = X^T X_A w, so each event's step length is closed-form."""
  st, c, active = carry
  n, d, C = Xt.shape
  m = st.Ks.shape[0]
  dt = Xt.dtype
  mat = lambda x: x / one
  inf = jnp.asarray(jnp.inf, dt)
  iod = lax.broadcasted_iota(jnp.int32, (d, C), 0)
  iom = lax.broadcasted_iota(dt, (m, C), 0)
  live = ~st.done & ~st.fail & (st.steps < limit)
  occ = st.idx < d
  w = mat(_mv(st.Ks, st.ss))
  a = mat(_mtv(Xt, mat(_mv(st.Xs, w))))
  # Entering: inactive j whose c_j - g a_j reaches +(lamc - g) (g_p) or -(lamc - g) (g_m). The
  # variable dropped at the last step sits exactly on the boundary of its old sign, so that one
  # candidate (g = 0 up to round-off) is excluded once; it may re-enter with the other sign.
  # With all m = min(n, d) slots taken nothing can enter: for n < d, X_A is then square and every
  # inactive j would reach the boundary only at lamc = 0, a tie that round-off must not break early.
  can_enter = ~active & (xx > 0) & ~_fold(jnp.logical_and, occ)[None]
  just_dropped = iod == st.dropped[None]
  den_p, den_m = 1 - a, 1 + a
  ok_p = can_enter & ~(just_dropped & (c > 0)) & (den_p > 0)
  ok_m = can_enter & ~(just_dropped & (c <= 0)) & (den_m > 0)
  g_p = jnp.where(ok_p, jnp.maximum(st.lamc - c, 0) / jnp.where(ok_p, den_p, 1), inf)
  g_m = jnp.where(ok_m, jnp.maximum(st.lamc + c, 0) / jnp.where(ok_m, den_m, 1), inf)
  g_in = mat(jnp.minimum(g_p, g_m))
  # Leaving: an active coefficient moving towards zero reaches it.
  g_out = mat(jnp.where(occ & (st.bs * w < 0), -st.bs / jnp.where(w != 0, w, 1), inf))
  gi, go = mat(_fold(jnp.minimum, g_in)), mat(_fold(jnp.minimum, g_out))
  g_end = st.lamc - lam
  target = g_end <= jnp.minimum(gi, go)
  add = live & ~target & (gi <= go)
  drop = live & ~target & ~(gi <= go)
  gamma = mat(jnp.where(live, jnp.minimum(g_end, jnp.minimum(gi, go)), 0))
  bs = st.bs + gamma[None] * w
  c = c - gamma[None] * a
  lamc = st.lamc - gamma
  # Event coordinates, materialised: each is broadcast over (d, C)-sized consumers below.
  j = mat(_first(g_in == gi[None], dt))          # entering variable
  t_free = mat(_first(~occ, dt))                 # its slot
  t = mat(jnp.where(add, t_free, _first(g_out == go[None], dt)))
  ej = ((iod.astype(dt) == j[None]) & add[None]).astype(dt)
  et = (iom == t[None]) & (add | drop)[None]
  etf = et.astype(dt)
  sgn = mat(_fold(jnp.add, jnp.where(ej > 0, jnp.where(g_p <= g_m, 1.0, -1.0), 0.0).astype(dt)))
  # Rank-one update of Ks by the block-inverse (Schur complement) formulas: adding x_j with
  # b = X_A^T x_j, u = Ks b, sigma = |x_j|^2 - b.u gives Ks + (u - e)(u - e)^T / sigma - e e^T;
  # removing slot t with u = Ks e gives Ks - u u^T / u_t + e e^T.
  xj = mat(_mv(Xt, ej))
  b = mat(_mtv(st.Xs, xj))
  u = mat(_mv(st.Ks, jnp.where(add[None], b, etf)))
  xjj = _fold(jnp.add, xx * ej)
  sigma = mat(xjj - _fold(jnp.add, b * u))
  u_t = mat(_fold(jnp.add, u * etf))
  den = jnp.where(add, sigma, jnp.where(drop, u_t, 1))
  z = mat(jnp.where(add[None], u - etf, u) * lax.rsqrt(jnp.abs(den))[None])
  sz = mat(jnp.where(add, 1.0, jnp.where(drop, -1.0, 0.0)).astype(dt))
  Ks = st.Ks + sz[None, None] * (z[:, None] * z[None, :] - etf[:, None] * etf[None, :])
  Xs = jnp.where(et[None], xj[:, None], st.Xs)   # xj = 0 when dropping
  leaving = mat(_fold(jnp.add, jnp.where(et & drop[None], st.idx.astype(dt), 0))).astype(jnp.int32)
  idx = jnp.where(et, jnp.where(add, j.astype(jnp.int32), d)[None], st.idx)
  ss = jnp.where(et, jnp.where(add, sgn, 0)[None], st.ss)
  bs = jnp.where(et, 0, bs)
  active = (active | (ej > 0)) & ~((iod == leaving[None]) & drop[None])
  # A pivot lost to round-off (or a degenerate path: x_j in the span of X_A).
  bad = ((add & ~(sigma > 1e-6 * xjj)) | (drop & ~(u_t > 0))
         | ~_fold(jnp.logical_and, jnp.isfinite(bs)))
  st = _PathState(lamc=lamc, Xs=Xs, Ks=Ks, idx=idx, ss=ss, bs=bs,
                  done=st.done | (live & target), fail=st.fail | (live & bad),
                  steps=st.steps + live.astype(jnp.int32),
                  dropped=jnp.where(drop, leaving, jnp.where(live, -1, st.dropped)))
  return st, c, active


def _path_finish(st, Xt, yt, lam, tol, one):
  """beta from the slots after two Newton (iterative-refinement) steps on the active set's
  optimality condition X_A^T r = lam s_A, which remove the round-off the path accumulated; then
  its duality gap (same formula as `duality_gap`) and the certificate threshold."""
  n, d, C = Xt.shape
  mat = lambda x: x / one
  occ = st.idx < d
  bs = st.bs
  for _ in range(2):
    r = mat(yt - _mv(st.Xs, bs))
    bs = mat(bs + jnp.where(occ, _mv(st.Ks, jnp.where(occ, _mtv(st.Xs, r) - lam * st.ss, 0)), 0))
  iod = lax.broadcasted_iota(jnp.int32, (d, C), 0)
  beta = mat(_fold(jnp.add, jnp.where(iod[None] == st.idx[:, None], bs[:, None], 0)))
  r = mat(yt - _mv(Xt, beta))
  g = mat(_mtv(Xt, r))
  s = jnp.minimum(1.0, lam / jnp.maximum(_fold(jnp.maximum, jnp.abs(g)), jnp.finfo(Xt.dtype).tiny))
  gap = 0.5 * (1.0 - s) ** 2 * _fold(jnp.add, r * r) + _fold(jnp.add, lam * jnp.abs(beta) - s * beta * g)
  threshold = tol * jnp.maximum(1.0, 0.5 * _fold(jnp.add, yt * yt))
  return beta, gap, threshold


@functools.partial(jax.jit, static_argnames=("tol",))
def _homotopy_chunk(Xt, yt, state, lam, limit, one, *, tol):
  """Runs the path of each instance of a chunk (Xt (n, d, C), yt (n, C), state: batch-last) until
  it reaches lam, fails or has taken `limit` steps. Returns the state and the refined beta (d, C),
  gap and threshold (meaningful where done). Zero padding rows (X = 0, y = 0, fresh state) are
  done at once: lam >= ||X^T y||_inf = 0."""
  n, d, C = Xt.shape
  xx = _mtv(Xt * Xt, jnp.ones((n, C), Xt.dtype)) / one
  st, c, active = _path_resume(state, Xt, yt, xx, lam, one)
  st, _, _ = lax.while_loop(lambda s: jnp.any(~s[0].done & ~s[0].fail & (s[0].steps < limit)),
                            lambda s: _path_step(s, Xt, xx, lam, limit, one), (st, c, active))
  return (st,) + _path_finish(st, Xt, yt, lam, tol, one)


def _homotopy_batch(X, y, lam, tol, *, max_steps, chunk):
  """Host driver: rounds of growing step limits (8, 12, 18, ...); after each round the finished
  instances are recorded and the rest continue, regrouped into full chunks, so a chunk's while
  loop is not held up by the rare long path (median 6 steps, max ~25 on the paper's setting).
  One compiled kernel of fixed chunk size serves every round. Chunks are transposed to batch-last
  here, by NumPy: inside the kernel XLA keeps a transposed X as a strided view (a free "bitcast"
  layout) that every consumer outside the while loop then reads element by element."""
  X, y = np.asarray(X), np.asarray(y)
  B, n, d = X.shape
  C = min(chunk, 1 << (B - 1).bit_length())
  one = jnp.ones((), X.dtype)
  beta = np.zeros((B, d), X.dtype)
  gap = np.full(B, np.inf, X.dtype)
  threshold = np.zeros(B, X.dtype)
  steps = np.zeros(B, np.int32)
  zero = jax.device_put(_path_zero_state(n, d, C, X.dtype))
  pos, state = np.arange(B), None   # state: batch-last arrays for the rows `pos`; None = fresh
  limit = 0
  while pos.size and limit < max_steps:
    limit = min(max(8, limit + limit // 2), max_steps)
    last = limit >= max_steps
    limit_arr = jnp.asarray(limit, jnp.int32)
    kept = []

    def collect(rows, out):
      st, b, g, thr = out
      k = rows.size
      st = _PathState(*(np.asarray(a)[..., :k] for a in st))
      stop = st.done | st.fail | last
      fin = rows[stop]
      beta[fin] = np.asarray(b)[:, :k][:, stop].T
      gap[fin] = np.where(st.done[stop], np.asarray(g)[:k][stop], np.inf)
      threshold[rows] = np.asarray(thr)[:k]
      steps[rows] = st.steps
      go = np.flatnonzero(~stop)
      kept.append((rows[go], _PathState(*(a[..., go] for a in st))))

    pending = None
    for i in range(0, pos.size, C):
      rows = pos[i:i + C]
      k = rows.size
      Xc, yc = (X[i:i + C], y[i:i + C]) if state is None else (X[rows], y[rows])
      sc = zero if state is None else _PathState(*(a[..., i:i + C] for a in state))
      if k < C:   # the last, partial chunk: zero padding (a fresh zero state)
        Xc = np.concatenate([Xc, np.zeros((C - k, n, d), X.dtype)])
        yc = np.concatenate([yc, np.zeros((C - k, n), y.dtype)])
        if state is not None:
          sc = _PathState(*(np.concatenate([a, np.zeros(a.shape[:-1] + (C - k,), a.dtype)], axis=-1) for a in sc))
      Xt, yt = np.ascontiguousarray(Xc.transpose(1, 2, 0)), np.ascontiguousarray(yc.T)
      out = _homotopy_chunk(Xt, yt, sc, lam, limit_arr, one, tol=tol)
      # Results are read one chunk behind the dispatch, so host work overlaps the next chunk's
      # (asynchronous) kernel where a second core is free, and memory stays at two chunks.
      if pending is not None:
        collect(*pending)
      pending = rows, out
    collect(*pending)
    pos = np.concatenate([r for r, _ in kept])
    state = _PathState(*(np.concatenate(leaves, axis=-1) for leaves in zip(*(s for _, s in kept))))
  return beta, gap, steps, threshold


def lasso_batch(X, y, lam, tol: float | None = None, *, method: str = "homotopy", max_steps: int | None = None,
                max_iters: int = 20000, check_every: int = 10, first_round: int = 100,
                chunk: int = 256) -> LassoInfo:
  """Converged LASSO for a whole batch X (B, n, d), y (B, n), each instance minimising
  (1/2)||y - X beta||^2 + lam ||beta||_1 (section 4.1), with the same certificate as `lasso`:
  duality_gap(beta) <= tol * max(1, (1/2)||y||^2). Returns a batched `LassoInfo`.

  method="homotopy" (default): the LASSO homotopy / LARS-LASSO algorithm (Osborne, Presnell &
  Turlach 2000; Efron et al. 2004). The solution path beta(lam') is piecewise linear in lam';
  starting from beta = 0 at lam' = ||X^T y||_inf it is followed kink by kink (a variable enters
  or leaves the active set) down to lam, each kink costing a few small matrix-vector products
  (O(n d)) and a rank-one update of the active set's inverse Gram matrix. It is exact after
  finitely many kinks -- on the paper's setting (d = 20, n = 10, lam = 0.1) median 6, mean 7,
  max 25 -- while first-order methods need 10^2-10^3 iterations of similar cost (FISTA: median
  ~120; coordinate descent, scikit-learn's `Lasso` algorithm: median ~110 sweeps, some instances
  over 3000), so it is much cheaper per certified instance. The path's end point gets two Newton
  refinement steps and its duality gap is checked; an instance the path cannot certify (a
  degenerate path, round-off accumulated in float32 over a long path, or more than `max_steps`
  kinks -- about 1 in 10^5 paper instances) is solved again by the FISTA method below.
  `num_iters` counts path steps (plus FISTA iterations for such an instance). `max_steps`
  defaults to 10 min(n, d) + 10.

  method="fista": the `lasso` solver (FISTA with restart) on every instance. A vmapped batch would
  iterate until its slowest instance converges (the median instance needs ~25x fewer iterations
  than the slowest); instead the batch runs in rounds of doubling length (first_round,
  2 first_round, ...), the host dropping certified instances after each round and compacting the
  rest into a power-of-two bucket. Same iterations and stopping rule as `lasso`; `num_iters`
  counts FISTA iterations. `max_iters`, `check_every` and `first_round` also apply to the
  homotopy's FISTA fallback.

  Both methods process instances in chunks of `chunk`, sized so a chunk's data stays in cache.
  A host-driven loop (rounds, compaction), so not jittable: call it on concrete arrays; inside
  jit or vmap use `lasso`. Not differentiable itself: pass its solutions through
  `jax.vmap(lasso_implicit, (0, 0, None, 0))(X, y, lam, info.beta)` for the derivative.
  """
  if not all(_checks.is_concrete(a) for a in (X, y, lam)):
    raise ValueError("X, y, lam: lasso_batch drives its rounds from the host and needs concrete "
                     "arrays, got traced values; inside jit / vmap use jax.vmap(lasso)")
  Bshape = _checks.check_ndim("X", X, 3, "(B, n, d): a batch of measurement matrices")
  yshape = _checks.check_ndim("y", y, 2, f"(B, n) = {Bshape[:2]}")
  if yshape != Bshape[:2]:
    raise ValueError(f"y: expected shape {Bshape[:2]} to match X {Bshape}, got {yshape}")
  if _checks.shape_of("lam", lam) != ():
    raise ValueError(f"lam: expected a scalar, got shape {_checks.shape_of('lam', lam)}")
  _checks.check_nonnegative("lam", lam)
  tol = _tol_for(_checks.float_dtype(X, y), tol)
  if method not in ("homotopy", "fista"):
    raise ValueError(f"method: expected 'homotopy' or 'fista', got {method!r}")
  if max_steps is None:
    max_steps = 10 * min(Bshape[1:]) + 10
  _checks.check_positive_int("max_steps", max_steps)
  _checks.check_positive_int("max_iters", max_iters)
  _checks.check_positive_int("check_every", check_every)
  _checks.check_positive_int("first_round", first_round)
  _checks.check_positive_int("chunk", chunk)
  dtype = _checks.float_dtype(X, y)
  X = jnp.asarray(X, dtype)
  y = jnp.asarray(y, dtype)
  lam = jnp.asarray(lam, dtype)
  fista_args = dict(max_iters=max_iters, check_every=check_every, first_round=first_round, chunk=chunk)
  if Bshape[0] == 0:
    z = jnp.zeros((0,), X.dtype)
    return LassoInfo(jnp.zeros((0, Bshape[2]), X.dtype), z, jnp.zeros((0,), jnp.int32), jnp.zeros((0,), bool))
  if 0 in Bshape[1:]:   # no measurements or no unknowns: beta = 0 is exact, certified by `lasso`
    return jax.vmap(lambda X, y: _lasso(X, y, lam, tol=tol, max_iters=max_iters, check_every=check_every))(X, y)
  if method == "fista":
    beta, gap, iters, threshold = _fista_batch(X, y, lam, tol, **fista_args)
  else:
    beta, gap, iters, threshold = _homotopy_batch(X, y, lam, tol, max_steps=max_steps, chunk=chunk)
    if float(lam) == 0:   # the path's own gap uses the lam > 0 dual point (see duality_gap)
      gap = np.where(np.isfinite(gap), np.asarray(_ls_gaps(X, y, jnp.asarray(beta))), gap)
    redo = np.flatnonzero(~(gap <= threshold))
    if redo.size:
      sel = jnp.asarray(redo)
      b, g, it, _ = _fista_batch(X[sel], y[sel], lam, tol, **fista_args)
      beta[redo], gap[redo], iters[redo] = b, g, iters[redo] + it
  return LassoInfo(jnp.asarray(beta), jnp.asarray(gap), jnp.asarray(iters), jnp.asarray(gap <= threshold))


BEST_SUBSET_MAX = 10 ** 6   # subsets per instance; the list alone would take minutes beyond it


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
  if math.comb(idx.size, s) > BEST_SUBSET_MAX:
    raise ValueError(f"s: best_subset solves every S-subset of the support, C({idx.size}, {s}) = "
                     f"{math.comb(idx.size, s):,} here; expected at most {BEST_SUBSET_MAX:,}")
  subsets = np.array(list(itertools.combinations(idx.tolist(), s)), np.int32)
  dtype = _checks.float_dtype(X, y)
  return _best_subset(jnp.asarray(X, dtype), jnp.asarray(y, dtype), jnp.asarray(subsets))


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
