"""ISTA / FISTA / converged LASSO against scikit-learn; duality gap; vmap and jit; bad input."""
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
    (lambda X, y: L.lasso(X, y[:, None], 0.1), "y: expected a 1-D array"),
])
def test_bad_input(instances, call, match):
  X, y = (a[0].astype(np.float32) for a in instances)
  with pytest.raises(ValueError, match=match):
    call(X, y)


def test_lasso_batch_equals_vmapped_lasso():
  t = L.sample_tasks(jax.random.key(4), 300, d=20, n=10, s=3)
  info = L.lasso_batch(t.X, t.y, 0.1, first_round=20, chunk=64)
  ref = jax.vmap(lambda X, y: L.lasso(X, y, 0.1, return_info=True))(t.X, t.y)
  assert bool(jnp.all(info.converged)) and info.beta.shape == (300, 20)
  # Same iterations from the same start: an instance stops at its first certified check either way.
  np.testing.assert_array_equal(info.num_iters, ref.num_iters)
  np.testing.assert_allclose(info.beta, ref.beta, atol=1e-6)
  with pytest.raises(ValueError, match="X: expected a 3-D array"):
    L.lasso_batch(t.X[0], t.y[0], 0.1)
  with pytest.raises(ValueError, match="y: expected shape"):
    L.lasso_batch(t.X, t.y[:5], 0.1)
