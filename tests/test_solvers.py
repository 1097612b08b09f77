"""ISTA / FISTA / converged LASSO against scikit-learn; duality gap; vmap and jit; bad input."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.linear_model import Lasso

import l2o_jax as L


def sklearn_lasso(X, y, lam):
  # scikit-learn minimises (1/2n)||y - Xb||^2 + alpha ||b||_1, so alpha = lam / n.
  n = X.shape[0]
  m = Lasso(alpha=lam / n, fit_intercept=False, tol=1e-14, max_iter=1_000_000).fit(X, y)
  return m.coef_


@pytest.fixture(scope="module")
def instances():
  """Paper-setting instances (n=10 < d=20) in float64."""
  t = L.sample_tasks(jax.random.key(0), 6, d=20, n=10, s=3)
  return np.asarray(t.X, np.float64), np.asarray(t.y, np.float64)


def test_lasso_matches_sklearn_float64(instances):
  X, y = instances
  with jax.enable_x64():
    for lam in (0.05, 0.5):
      info = jax.vmap(lambda a, b: L.lasso(a, b, lam, return_info=True))(jnp.asarray(X), jnp.asarray(y))
      assert bool(jnp.all(info.converged))
      for k in range(X.shape[0]):
        np.testing.assert_allclose(info.beta[k], sklearn_lasso(X[k], y[k], lam), atol=1e-5)


def test_lasso_float32_certificate(instances):
  X, y = instances
  info = L.lasso(X[0].astype(np.float32), y[0].astype(np.float32), 0.1, return_info=True)
  assert info.beta.dtype == jnp.float32 and bool(info.converged)
  np.testing.assert_allclose(info.beta, sklearn_lasso(X[0], y[0], 0.1), atol=2e-3)


def test_fista_many_iterations_matches_sklearn():
  # Overdetermined (strongly convex) so FISTA reaches 1e-5 in a few thousand steps.
  rng = np.random.default_rng(1)
  X = rng.normal(size=(40, 12))
  beta = np.zeros(12)
  beta[[1, 5, 8]] = rng.normal(size=3)
  y = X @ beta + 0.1 * rng.normal(size=40)
  with jax.enable_x64():
    b = L.fista(jnp.asarray(X), jnp.asarray(y), 0.3, 3000)
    ib = L.ista(jnp.asarray(X), jnp.asarray(y), 0.3, 3000)
  ref = sklearn_lasso(X, y, 0.3)
  np.testing.assert_allclose(b, ref, atol=1e-5)
  np.testing.assert_allclose(ib, ref, atol=1e-5)


def test_duality_gap(instances):
  X, y = instances
  with jax.enable_x64():
    X0, y0 = jnp.asarray(X[0]), jnp.asarray(y[0])
    lam = 0.2
    rng = np.random.default_rng(2)
    for _ in range(5):
      b = jnp.asarray(rng.normal(size=20))
      gap = L.duality_gap(X0, y0, b, lam)
      # Naive P - D with the same dual point must agree, and weak duality makes it >= 0.
      r = y0 - X0 @ b
      s = min(1.0, lam / float(jnp.max(jnp.abs(X0.T @ r))))
      nu = s * r
      naive = L.lasso_objective(X0, y0, b, lam) - (0.5 * y0 @ y0 - 0.5 * (y0 - nu) @ (y0 - nu))
      assert float(gap) >= 0
      np.testing.assert_allclose(gap, naive, rtol=1e-9, atol=1e-9)
    sol = jnp.asarray(sklearn_lasso(X[0], y[0], lam))
    assert float(L.duality_gap(X0, y0, sol, lam)) < 1e-8


def test_ista_fista_iteration_formula(instances):
  X, y = (a[0].astype(np.float32) for a in instances)
  lam, K = 0.1, 5
  Lc = np.linalg.eigvalsh(X.T.astype(np.float64) @ X)[-1]
  b = np.zeros(20)
  traj = []
  z, t, prev = np.zeros(20), 1.0, np.zeros(20)
  ftraj = []
  for _ in range(K):
    g = b - X.T @ (X @ b - y) / Lc
    b = np.sign(g) * np.maximum(np.abs(g) - lam / Lc, 0)
    traj.append(b)
    g = z - X.T @ (X @ z - y) / Lc
    nb = np.sign(g) * np.maximum(np.abs(g) - lam / Lc, 0)
    tn = (1 + np.sqrt(1 + 4 * t * t)) / 2
    z = nb + (t - 1) / tn * (nb - prev)
    prev, t = nb, tn
    ftraj.append(nb)
  np.testing.assert_allclose(L.ista(X, y, lam, K, return_trajectory=True), np.stack(traj), atol=1e-5)
  np.testing.assert_allclose(L.fista(X, y, lam, K, return_trajectory=True), np.stack(ftraj), atol=1e-5)
  np.testing.assert_allclose(L.ista(X, y, lam, K), traj[-1], atol=1e-5)


def test_vmap_equals_loop_and_jit_equals_nojit(instances):
  X, y = (a.astype(np.float32) for a in instances)
  for solver in (L.ista, L.fista):
    batched = jax.vmap(lambda a, b: solver(a, b, 0.1, 12))(X, y)
    loop = np.stack([solver(X[k], y[k], 0.1, 12) for k in range(len(X))])
    np.testing.assert_allclose(batched, loop, atol=1e-6)
    jitted = jax.jit(lambda a, b: solver(a, b, 0.1, 12))(X[0], y[0])
    np.testing.assert_allclose(jitted, loop[0], atol=1e-6)
  lb = jax.vmap(lambda a, b: L.lasso(a, b, 0.1))(X, y)
  ll = np.stack([L.lasso(X[k], y[k], 0.1) for k in range(len(X))])
  np.testing.assert_allclose(lb, ll, atol=1e-4)


def test_best_subset_recovers_noiseless_beta():
  t = L.sample_tasks(jax.random.key(3), 8, d=12, n=6, s=2)
  b = jax.vmap(lambda X, y: L.best_subset(X, y, 2))(t.X, t.y)
  np.testing.assert_allclose(b, t.beta, atol=1e-4)


@pytest.mark.parametrize("call, match", [
    (lambda X, y: L.ista(X, y[:5], 0.1, 3), r"y: expected shape \(10,\) to match X's 10 rows"),
    (lambda X, y: L.fista(X[None], y, 0.1, 3), "X: expected a 2-D array"),
    (lambda X, y: L.ista(X, y, -0.1, 3), "lam: expected values >= 0"),
    (lambda X, y: L.ista(X, y, 0.1, 0), "num_iters: expected an integer >= 1"),
    (lambda X, y: L.fista(X, y, np.ones(2), 3), "lam: expected a scalar"),
    (lambda X, y: L.lasso(X, y, -1.0), "lam"),
    (lambda X, y: L.lasso(X, y, 0.1, tol=0.0), "tol"),
    (lambda X, y: L.lasso(X, y, 0.1, tol=float("inf")), "tol: expected a finite float > 0, got inf"),
    (lambda X, y: L.lasso(X, y, 0.1, tol=True), "tol: expected a finite float > 0, got True"),
    (lambda X, y: L.lasso(X, y[:, None], 0.1), "y: expected a 1-D array"),
    (lambda X, y: L.lasso_objective(X, y, np.ones((20, 1)), 0.1), r"beta: expected shape \(d,\) = \(20,\)"),
    (lambda X, y: L.duality_gap(X, y, np.ones(19), 0.1), r"beta: expected shape \(d,\) = \(20,\)"),
    (lambda X, y: L.duality_gap(X, y, np.ones(20), -0.1), "lam: expected values >= 0"),
    (lambda X, y: L.lasso_objective(X, y, np.ones(20), -0.1), "lam: expected values >= 0"),
    (lambda X, y: L.lipschitz(X[0]), "X: expected a 2-D array"),
    (lambda X, y: L.lasso_implicit(X, y, 0.1, np.ones(19)), r"beta: expected shape \(d,\) = \(20,\)"),
    (lambda X, y: L.lasso_implicit(X, y, -0.1, np.ones(20)), "lam: expected values >= 0"),
    (lambda X, y: L.best_subset(X[:, :2], y, 3), r"s: expected s <= d=2"),
    (lambda X, y: jax.jit(lambda X, y: L.lasso_batch(X, y, 0.1))(X[None], y[None]), "needs concrete arrays"),
])
def test_bad_input(instances, call, match):
  X, y = (a[0].astype(np.float32) for a in instances)
  with pytest.raises(ValueError, match=match):
    call(X, y)


def test_integer_mixed_and_empty_inputs():
  # Integer data runs in float32; float32 X with float64 y (x64 on) runs in float64; no
  # measurements (n = 0) or no unknowns (d = 0) give the exact beta = 0, certified.
  rng = np.random.default_rng(0)
  Xi, yi = rng.integers(-3, 4, (4, 6)), rng.integers(-3, 4, 4)
  for solver in (lambda X, y: L.ista(X, y, 0.1, 5), lambda X, y: L.fista(X, y, 0.1, 5),
                 lambda X, y: L.lasso(X, y, 0.1)):
    got = solver(Xi, yi)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, solver(Xi.astype(np.float32), yi.astype(np.float32)), rtol=1e-6, atol=1e-7)
  with jax.enable_x64():
    got = L.ista(Xi.astype(np.float32), yi.astype(np.float64), 0.1, 5)
    assert got.dtype == jnp.float64
  for X, y in ((np.zeros((0, 3), np.float32), np.zeros(0, np.float32)),
               (np.zeros((4, 0), np.float32), np.ones(4, np.float32))):
    for beta in (L.ista(X, y, 0.1, 3), L.fista(X, y, 0.1, 3)):
      assert beta.shape == (X.shape[1],) and not np.any(beta)
    info = L.lasso(X, y, 0.1, return_info=True)
    assert info.beta.shape == (X.shape[1],) and bool(info.converged)
    batch = L.lasso_batch(X[None], y[None], 0.1)
    assert batch.beta.shape == (1, X.shape[1]) and bool(batch.converged[0])


def test_lasso_respects_max_iters_and_traced_lam(instances):
  X, y = (a[0].astype(np.float32) for a in instances)
  for max_iters, check_every in ((15, 10), (5, 10), (20, 10)):
    info = L.lasso(X, y, 1e-4, tol=1e-12, max_iters=max_iters, check_every=check_every, return_info=True)
    assert int(info.num_iters) == max_iters and not bool(info.converged)
  # Stopping after 15 iterations equals 15 FISTA-with-restart iterations run in blocks of 5.
  a = L.lasso(X, y, 1e-4, tol=1e-12, max_iters=15, check_every=10)
  b = L.lasso(X, y, 1e-4, tol=1e-12, max_iters=15, check_every=5)
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # lam vmapped: a negative one (unchecked while traced) is never reported as certified.
  info = jax.vmap(lambda lam: L.lasso(X, y, lam, return_info=True))(jnp.array([-0.1, 0.1]))
  assert info.converged.tolist() == [False, True]


def test_lasso_gradient_is_the_implicit_derivative_float64(instances):
  """d lasso / d (X, y, lam) (implicit differentiation of the optimality conditions) against
  central finite differences and against differentiating 20,000 unrolled FISTA iterations, an
  independent route to the same derivative; jacfwd == jacrev; vmapped grads == a loop; the same
  derivative for lasso_batch's solutions through lasso_implicit."""
  X, y = instances[0][0], instances[1][0]
  w = np.random.default_rng(0).normal(size=X.shape[1])
  lam, eps = 0.3, 1e-5
  with jax.enable_x64():
    solve = lambda X, y, lam: L.lasso(X, y, lam, tol=1e-14, max_iters=200_000)
    f = lambda X, y, lam: jnp.dot(w, solve(X, y, lam))
    beta = np.asarray(solve(X, y, lam))
    on, off = np.flatnonzero(beta), np.flatnonzero(beta == 0)
    assert 0 < len(on) < X.shape[0] and len(off)
    gX, gy, glam = (np.asarray(g) for g in jax.grad(f, argnums=(0, 1, 2))(X, y, lam))

    def fd(dX=0.0, dy=0.0, dlam=0.0):
      return float(f(X + dX, y + dy, lam + dlam) - f(X - dX, y - dy, lam - dlam)) / (2 * eps)

    unit = lambda shape, i: eps * np.eye(np.prod(shape))[np.ravel_multi_index(i, shape)].reshape(shape)
    # Round-off floor of the central difference: f is solved to machine precision, so the two
    # evaluations differ by a few ulp(f) even where the true derivative is 0 (an inactive
    # column): 4 ulp(f) / (2 eps) = 1.8e-10 on an AMD Zen 3 (|f| = 4.25), over the former 1e-10.
    floor = 100 * np.finfo(np.float64).eps * max(1.0, abs(float(w @ beta))) / eps
    assert glam == pytest.approx(fd(dlam=eps), rel=1e-6, abs=floor)
    assert gy[3] == pytest.approx(fd(dy=unit(y.shape, (3,))), rel=1e-6, abs=floor)
    for i, j in ((2, on[0]), (7, on[-1]), (4, off[0])):
      assert gX[i, j] == pytest.approx(fd(dX=unit(X.shape, (i, j))), rel=1e-6, abs=floor)
    assert np.all(gX[:, off] == 0)   # moving an inactive column slightly keeps it inactive

    unrolled = jax.grad(lambda X, y, lam: jnp.dot(w, L.fista(X, y, lam, 20_000)), argnums=(0, 1, 2))(X, y, lam)
    for a, b in zip(unrolled, (gX, gy, glam)):
      np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)

    np.testing.assert_allclose(jax.jacfwd(solve, argnums=1)(X, y, lam),
                               jax.jacrev(solve, argnums=1)(X, y, lam), atol=1e-12)
    Xs, ys = instances
    lams = np.linspace(0.1, 0.4, len(Xs))
    grad_lam = jax.grad(f, argnums=2)
    np.testing.assert_allclose(jax.vmap(grad_lam)(Xs, ys, lams),
                               [grad_lam(a, b, c) for a, b, c in zip(Xs, ys, lams)], rtol=1e-10, atol=1e-12)
    # lasso_batch's solutions (a host driver) get the same derivative through lasso_implicit.
    betas = L.lasso_batch(Xs, ys, lam, tol=1e-14).beta
    via_batch = jax.grad(lambda Xs, ys: jnp.sum(jax.vmap(L.lasso_implicit, (0, 0, None, 0))(Xs, ys, lam, betas) @ w),
                         argnums=(0, 1))(Xs, ys)
    direct = jax.vmap(jax.grad(f, argnums=(0, 1)), (0, 0, None))(Xs, ys, lam)
    for a, b in zip(via_batch, direct):
      np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)


def test_lasso_batch_equals_vmapped_lasso():
  t = L.sample_tasks(jax.random.key(4), 300, d=20, n=10, s=3)
  info = L.lasso_batch(t.X, t.y, 0.1, method="fista", first_round=20, chunk=64)
  ref = jax.vmap(lambda X, y: L.lasso(X, y, 0.1, return_info=True))(t.X, t.y)
  assert bool(jnp.all(info.converged)) and info.beta.shape == (300, 20)
  # Same iterations from the same start: an instance stops at its first certified check either way.
  np.testing.assert_array_equal(info.num_iters, ref.num_iters)
  np.testing.assert_allclose(info.beta, ref.beta, atol=1e-6)
  with pytest.raises(ValueError, match="X: expected a 3-D array"):
    L.lasso_batch(t.X[0], t.y[0], 0.1)
  with pytest.raises(ValueError, match="y: expected shape"):
    L.lasso_batch(t.X, t.y[:5], 0.1)


def _rel_gaps(X, y, beta, lam):
  """duality_gap / max(1, ||y||^2 / 2) per instance, in float64 NumPy (the certificate's scale)."""
  X, y, beta = (np.asarray(a, np.float64) for a in (X, y, beta))
  with jax.enable_x64():
    gap = jax.vmap(lambda a, b, c: L.duality_gap(a, b, c, lam))(jnp.asarray(X), jnp.asarray(y), jnp.asarray(beta))
  return np.asarray(gap) / np.maximum(1.0, 0.5 * np.sum(y * y, axis=1))


def test_lasso_batch_homotopy_matches_sklearn_float64():
  # Paper-shaped instances (n < d, unique solutions for lam > 0); lam = 1e3 > ||X^T y||_inf makes
  # beta = 0 optimal. One compile: lam is a runtime argument.
  t = L.sample_tasks(jax.random.key(5), 8, d=20, n=10, s=3)
  X, y = np.asarray(t.X, np.float64), np.asarray(t.y, np.float64)
  with jax.enable_x64():
    for lam in (0.05, 0.5, 1e3):
      info = L.lasso_batch(jnp.asarray(X), jnp.asarray(y), lam)
      assert info.beta.dtype == jnp.float64 and bool(jnp.all(info.converged))
      assert np.all(_rel_gaps(X, y, info.beta, lam) <= 1e-10)
      for k in range(X.shape[0]):
        np.testing.assert_allclose(info.beta[k], sklearn_lasso(X[k], y[k], lam), atol=1e-5)
  np.testing.assert_array_equal(info.beta, 0.0)          # lam = 1e3: the all-zero solution
  np.testing.assert_array_equal(info.num_iters, 0)       # ... found without a path step


def test_lasso_batch_homotopy_lam0_least_squares_float64():
  # Overdetermined (n > d): the lam = 0 path ends at the least-squares solution, with all d
  # variables active; scikit-learn's coordinate descent (alpha = 0) and lstsq agree. Noiseless
  # here; noisy data (a nonzero residual) in test_lam0_certificate_is_least_squares_suboptimality.
  rng = np.random.default_rng(6)
  X = rng.normal(size=(4, 30, 8))
  y = np.einsum("bnd,bd->bn", X, rng.normal(size=(4, 8)))
  with jax.enable_x64():
    info = L.lasso_batch(jnp.asarray(X), jnp.asarray(y), 0.0)
    assert bool(jnp.all(info.converged))
    for k in range(X.shape[0]):
      np.testing.assert_allclose(info.beta[k], np.linalg.lstsq(X[k], y[k], rcond=None)[0], atol=1e-8)
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # scikit-learn advises LinearRegression for alpha = 0
        np.testing.assert_allclose(info.beta[k], sklearn_lasso(X[k], y[k], 0.0), atol=1e-5)


def test_lam0_certificate_is_least_squares_suboptimality():
  """At lam = 0 (least squares) with noise, the residual at the optimum is nonzero; the gap is
  then (1/2)||P_X r||^2, which is exactly f(beta) - min f (against numpy's lstsq), and every
  solver certifies: lasso, lasso_batch's homotopy and FISTA methods, in float32 and float64. One
  instance has two equal columns (rank deficient: the optimum is not unique, its value is)."""
  rng = np.random.default_rng(6)
  B, n, d = 6, 30, 8
  X = rng.normal(size=(B, n, d))
  X[1, :, 3] = X[1, :, 2]
  y = np.einsum("bnd,bd->bn", X, rng.normal(size=(B, d))) + 0.5 * rng.normal(size=(B, n))
  f = lambda k, b: 0.5 * np.sum((y[k] - X[k] @ np.asarray(b, np.float64)) ** 2)
  fstar = [f(k, np.linalg.lstsq(X[k], y[k], rcond=None)[0]) for k in range(B)]
  scale = np.maximum(1.0, 0.5 * np.sum(y * y, axis=1))
  with jax.enable_x64():
    # The gap at arbitrary points is the suboptimality itself (and the lam > 0 formula's
    # (1/2)||r||^2 would be far above it).
    for k in range(B):
      b = rng.normal(size=d)
      np.testing.assert_allclose(float(L.duality_gap(X[k], y[k], b, 0.0)), f(k, b) - fstar[k], rtol=1e-9)
    for dtype, tol in ((np.float64, 1e-10), (np.float32, 1e-5)):
      Xa, ya = jnp.asarray(X.astype(dtype)), jnp.asarray(y.astype(dtype))
      infos = {"lasso": jax.vmap(lambda a, b: L.lasso(a, b, 0.0, return_info=True))(Xa, ya),
               "homotopy": L.lasso_batch(Xa, ya, 0.0),
               "fista": L.lasso_batch(Xa, ya, 0.0, method="fista")}
      for name, info in infos.items():
        assert info.beta.dtype == dtype and info.converged.tolist() == [True] * B, name
        subopt = np.array([f(k, info.beta[k]) - fstar[k] for k in range(B)])
        # float32: the certificate is computed in float32, so allow its round-off on top of tol.
        assert np.all(subopt <= (tol if dtype == np.float64 else 3 * tol) * scale), (name, subopt / scale)
      # The full-rank instances are certified at the path's end, not by the FISTA fallback
      # (which would add at least check_every = 10 iterations to the path's ~d + 1 steps).
      assert np.all(np.delete(np.asarray(infos["homotopy"].num_iters), 1) <= 2 * d)
  # vmapped over lam, 0 included: the SVD branch runs next to the lam > 0 one.
  info = jax.vmap(lambda lam: L.lasso(X[0].astype(np.float32), y[0].astype(np.float32), lam,
                                      return_info=True))(jnp.array([0.0, 0.1]))
  assert info.converged.tolist() == [True, True]


def test_lasso_batch_homotopy_float32_certified_and_matches_fista():
  # All float32 cases share one chunk shape (16 instances of (10, 20)), so the homotopy kernel
  # compiles once; 4 chunks, and later rounds regroup the longer paths into a partial chunk.
  t = L.sample_tasks(jax.random.key(7), 64, d=20, n=10, s=3)
  X, y, lam = np.array(t.X), np.array(t.y), 0.1
  X[3, :, 5] = 0.0                      # a zero column: variable 5 can never enter
  X[4], y[4] = 0.0, 0.0                 # X = 0, y = 0: beta = 0
  info = L.lasso_batch(X, y, lam, chunk=16)
  ref = jax.vmap(lambda a, b: L.lasso(a, b, lam, return_info=True))(X, y)
  assert info.beta.dtype == jnp.float32 and bool(jnp.all(info.converged)) and bool(jnp.all(ref.converged))
  # The certificate: float64 gaps within the tolerance (float32 round-off of the gap itself aside).
  assert np.all(_rel_gaps(X, y, info.beta, lam) <= 1.5e-5)
  assert float(jnp.max(jnp.abs(info.beta[3, 5]))) == 0.0 and float(jnp.max(jnp.abs(info.beta[4]))) == 0.0
  # Both solutions are within the certificate of the optimum, so their objectives agree to it.
  obj = lambda b: np.asarray(jax.vmap(lambda a, c, e: L.lasso_objective(a, c, e, lam))(X, y, b), np.float64)
  scale = np.maximum(1.0, 0.5 * np.sum(np.asarray(y, np.float64) ** 2, axis=1))
  assert np.all(np.abs(obj(info.beta) - obj(ref.beta)) <= 2e-5 * scale)
  np.testing.assert_allclose(info.beta, ref.beta, atol=2e-2)
  # The path's two Newton refinements leave float32 round-off (~6e-7), not its drift (~2e-5).
  exact = np.stack([sklearn_lasso(X[k].astype(np.float64), y[k].astype(np.float64), lam) for k in range(len(X))])
  np.testing.assert_allclose(info.beta, exact, atol=3e-6)
  # Path steps: the paper setting needs a handful of kinks, not FISTA's hundreds of iterations.
  assert int(jnp.max(info.num_iters)) <= 40 and float(jnp.median(info.num_iters)) < float(jnp.median(ref.num_iters))
  # Instances whose path is cut short (max_steps) are finished by FISTA, with the same certificate.
  short = L.lasso_batch(X, y, lam, max_steps=2, chunk=16)
  assert bool(jnp.all(short.converged)) and np.all(_rel_gaps(X, y, short.beta, lam) <= 1.5e-5)
  assert int(jnp.max(short.num_iters)) > 40   # path steps + FISTA iterations


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="cd"), "method: expected 'homotopy' or 'fista'"),
    (dict(max_steps=0), "max_steps: expected an integer >= 1"),
    (dict(chunk=0), "chunk: expected an integer >= 1"),
    (dict(tol=-1.0), "tol: expected a finite float > 0"),
    (dict(tol=float("inf")), "tol: expected a finite float > 0, got inf"),   # would certify beta = 0
    (dict(lam=-0.1), "lam: expected values >= 0"),
    (dict(lam=np.ones(2)), "lam: expected a scalar"),
])
def test_lasso_batch_bad_input(kwargs, match):
  X, y = np.ones((3, 4, 5), np.float32), np.ones((3, 4), np.float32)
  lam = kwargs.pop("lam", 0.1)
  with pytest.raises(ValueError, match=match):
    L.lasso_batch(X, y, lam, **kwargs)


def test_lasso_iterations_are_fista_with_gradient_restart(instances):
  # [solvers.lasso] K iterations of `lasso` equal a NumPy loop of FISTA with O'Donoghue-Candes
  # gradient restart (t <- 1 when (z - beta_next) . (beta_next - beta) > 0), and the restart fires.
  X, y = instances[0][0], instances[1][0]
  lam, K = 0.01, 60
  Lc = np.linalg.eigvalsh(X.T @ X)[-1]
  soft = lambda v, th: np.sign(v) * np.maximum(np.abs(v) - th, 0)
  beta, z, t, restarts = np.zeros(20), np.zeros(20), 1.0, 0
  for _ in range(K):
    nb = soft(z - X.T @ (X @ z - y) / Lc, lam / Lc)
    if (z - nb) @ (nb - beta) > 0:
      t, restarts = 1.0, restarts + 1
    tn = (1 + np.sqrt(1 + 4 * t * t)) / 2
    z, beta, t = nb + (t - 1) / tn * (nb - beta), nb, tn
  assert restarts > 0
  with jax.enable_x64():
    got = L.lasso(jnp.asarray(X), jnp.asarray(y), lam, tol=1e-300, max_iters=K, check_every=10)
    plain = L.fista(jnp.asarray(X), jnp.asarray(y), lam, K)
  np.testing.assert_allclose(got, beta, atol=1e-10)
  assert np.abs(np.asarray(plain) - beta).max() > 1e-6   # the restart changes the iterates


def test_duality_gap_dual_scale_is_capped_at_one(instances):
  # [solvers.duality_gap] s = min(1, lam / ||X^T r||_inf): where ||X^T r||_inf < lam the dual
  # point is r itself; beta = 0 is optimal for lam >= ||X^T y||_inf, so its gap is exactly 0.
  X, y = instances[0][0], instances[1][0]
  with jax.enable_x64():
    lam0 = float(np.abs(X.T @ y).max())
    for lam in (lam0, 1.5 * lam0):
      assert float(L.duality_gap(jnp.asarray(X), jnp.asarray(y), jnp.zeros(20), lam)) == 0.0
    # And below lam0 at beta = 0: s = lam / lam0 < 1, gap = (1/2)(1-s)^2 |y|^2 + 0.
    lam = 0.5 * lam0
    np.testing.assert_allclose(L.duality_gap(jnp.asarray(X), jnp.asarray(y), jnp.zeros(20), lam),
                               0.5 * 0.25 * y @ y, rtol=1e-12)
