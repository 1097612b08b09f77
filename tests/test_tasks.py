"""Task sampler: shapes, exact sparsity, support prior, fixed X, statistics, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import l2o_jax as L


@pytest.fixture(scope="module")
def big():
  return L.sample_tasks(jax.random.key(0), 20000, d=20, n=10, s=3)


def test_shapes_and_consistency(big):
  t = big
  assert t.X.shape == (20000, 10, 20) and t.y.shape == (20000, 10)
  assert t.x_query.shape == (20000, 20) and t.y_query.shape == (20000,) and t.beta.shape == (20000, 20)
  np.testing.assert_allclose(t.y, np.einsum("bnd,bd->bn", t.X, t.beta), atol=1e-5)
  np.testing.assert_allclose(t.y_query, np.einsum("bd,bd->b", t.x_query, t.beta), atol=1e-5)


def test_exactly_s_nonzeros_and_statistics(big):
  beta = np.asarray(big.beta)
  assert np.all((beta != 0).sum(1) == 3)
  # Uniform support: each coordinate is chosen with probability s/d = 0.15.
  freq = (beta != 0).mean(0)
  assert np.all(np.abs(freq - 0.15) < 0.015), freq
  vals = beta[beta != 0]
  assert abs(vals.mean()) < 0.03 and abs(vals.var() - 1) < 0.05
  X = np.asarray(big.X)
  assert abs(X.mean()) < 0.01 and abs(X.var() - 1) < 0.01
  # Rows of X are independent across instances and demonstrations.
  c = np.corrcoef(X[:, 0, 0], X[:, 1, 0])[0, 1]
  assert abs(c) < 0.03


@pytest.mark.parametrize("support", [10, np.array([1, 4, 7, 9, 15])])
def test_support_prior(support):
  t = L.sample_tasks(jax.random.key(1), 4000, s=3, support=support)
  allowed = np.zeros(20, bool)
  allowed[np.arange(support) if isinstance(support, int) else support] = True
  beta = np.asarray(t.beta)
  assert np.all((beta != 0).sum(1) == 3)
  assert not np.any(beta[:, ~allowed])
  freq = (beta != 0).mean(0)[allowed]
  assert np.all(np.abs(freq - 3 / allowed.sum()) < 0.04), freq


def test_fixed_X_shared_and_x_std_and_noise():
  X0 = np.random.default_rng(0).normal(size=(10, 20)).astype(np.float32)
  t = L.sample_tasks(jax.random.key(2), 64, X=X0)
  assert np.all(np.asarray(t.X) == X0[None])
  std = np.linspace(0.5, 2.0, 20).astype(np.float32)
  t = L.sample_tasks(jax.random.key(3), 8000, x_std=std, noise_std=0.5)
  np.testing.assert_allclose(np.asarray(t.X).std((0, 1)), std, rtol=0.05)
  resid = np.asarray(t.y) - np.einsum("bnd,bd->bn", t.X, t.beta)
  assert abs(resid.std() - 0.5) < 0.02
  # The query too: x_query has x_std, y_query its own noise, independent of y's.
  np.testing.assert_allclose(np.asarray(t.x_query).std(0), std, rtol=0.05)
  rq = np.asarray(t.y_query) - np.einsum("bd,bd->b", t.x_query, t.beta)
  assert abs(rq.std() - 0.5) < 0.02
  assert abs(np.corrcoef(rq, resid[:, 0])[0, 1]) < 0.05
  # One normal draw is sliced into X, x_query, beta*, noise: no overlap, so |X_b|_F^2 and
  # |beta_b|^2 are uncorrelated (0 +- 0.011 at 8000; an overlapping slice gave 0.14).
  norms = lambda a: np.sum(np.asarray(a, np.float64) ** 2, axis=tuple(range(1, np.ndim(a))))
  assert abs(np.corrcoef(norms(np.asarray(t.X) / std), norms(t.beta))[0, 1]) < 0.05


def test_jit_and_determinism():
  f = jax.jit(lambda k: L.sample_tasks(k, 16, d=8, n=5, s=2))
  a, b = f(jax.random.key(4)), L.sample_tasks(jax.random.key(4), 16, d=8, n=5, s=2)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  c = L.sample_tasks(jax.random.key(5), 16, d=8, n=5, s=2)
  assert not np.array_equal(a.beta, c.beta)


@pytest.mark.parametrize("kwargs, match", [
    (dict(batch=0), "batch"),
    (dict(batch=4, s=21), "s: expected 1 <= s <= d=20"),
    (dict(batch=4, s=0), "s"),
    (dict(batch=4, s=4, support=3), "s: expected s <= size of the support prior"),
    (dict(batch=4, support=25), "support"),
    (dict(batch=4, support=np.array([0, 0, 1])), "support: expected distinct"),
    (dict(batch=4, support=np.array(10)), r"support: .*got a 0-d array .*pass int\(support\)"),
    (dict(batch=4, X=np.zeros((5, 20))), r"X: expected shape \(n, d\) = \(10, 20\), got \(5, 20\)"),
    (dict(batch=4, X=np.zeros((10,))), "X: expected a 2-D array"),
    (dict(batch=4, X=np.full((10, 20), np.nan)), "X: expected finite entries"),
    (dict(batch=4, noise_std=-1.0), "noise_std"),
    (dict(batch=4, x_std=np.ones(3)), "x_std"),
    (dict(batch=2.5), "batch"),
])
def test_bad_input(kwargs, match):
  batch = kwargs.pop("batch")
  with pytest.raises(ValueError, match=match):
    L.sample_tasks(jax.random.key(0), batch, **kwargs)
