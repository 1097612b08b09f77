"""Prediction error, NMSE and the per-prompt-length helper."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import l2o_jax as L


def test_mean_interval_is_the_bootstrap_of_the_mean():
  rng = np.random.default_rng(0)
  e = rng.exponential(size=2000)
  lo, hi = L.mean_interval(e)
  # A plain loop of the definition: resample tasks with replacement, quantiles of the means.
  means = np.sort([e[rng.integers(0, e.size, e.size)].mean() for _ in range(2000)])
  np.testing.assert_allclose([lo, hi], [means[49], means[1949]], rtol=0.01)
  # ... and the normal approximation mean -+ 1.96 sd / sqrt(B) for this light-tailed sample.
  half = 1.96 * e.std() / np.sqrt(e.size)
  np.testing.assert_allclose([lo, hi], [e.mean() - half, e.mean() + half], rtol=0.01)
  assert L.mean_interval(e) == (lo, hi) and L.mean_interval(e, seed=1) != (lo, hi)   # seeded
  lo90, hi90 = L.mean_interval(e, level=0.9)
  assert lo < lo90 < hi90 < hi
  e[3] = np.nan          # an overflowed task counts as +inf: the upper end is inf, not NaN
  lo_nan, hi_nan = L.mean_interval(e)
  assert np.isfinite(lo_nan) and hi_nan == np.inf


@pytest.mark.parametrize("kwargs, match", [
    ({"errors": np.ones((3, 2))}, r"errors: expected a 1-D array"),
    ({"errors": np.ones(0)}, r"errors: expected at least one task"),
    ({"errors": np.ones(5), "level": 1.0}, r"level: expected a probability in \(0, 1\), got 1.0"),
    ({"errors": np.ones(5), "resamples": 0}, r"resamples: expected an integer >= 1, got 0"),
])
def test_mean_interval_bad_inputs(kwargs, match):
  with pytest.raises(ValueError, match=match):
    L.mean_interval(**kwargs)


def test_prediction_error_and_nmse():
  rng = np.random.default_rng(0)
  xq, b, bh = (rng.normal(size=(5, 4)) for _ in range(3))
  yq = np.einsum("bd,bd->b", xq, b)
  ref = np.mean((yq - np.einsum("bd,bd->b", xq, bh)) ** 2)
  np.testing.assert_allclose(L.prediction_error(yq, xq, bh), ref, rtol=1e-6)
  assert float(L.prediction_error(yq, xq, b)) < 1e-10
  nmse = 10 * np.log10(((bh - b) ** 2).sum() / (b ** 2).sum())
  np.testing.assert_allclose(L.beta_nmse_db(bh, b), nmse, rtol=1e-5)


def test_prediction_error_bad_shapes():
  with pytest.raises(ValueError, match="x_query"):
    L.prediction_error(np.ones(5), np.ones((5, 3)), np.ones((5, 4)))
  with pytest.raises(ValueError, match="y_query"):
    L.prediction_error(np.ones(4), np.ones((5, 3)), np.ones((5, 3)))


def test_per_prompt_length_uses_first_n():
  t = L.sample_tasks(jax.random.key(0), 256, d=10, n=6, s=2)
  est = L.batched(L.fista, lam=0.01, num_iters=20)
  curve = L.per_prompt_length(est, t, lengths=[1, 3, 6])
  assert sorted(curve) == [1, 3, 6]
  direct = float(L.prediction_error(t.y_query, t.x_query, est(t.X[:, :3], t.y[:, :3])))
  np.testing.assert_allclose(curve[3], direct, rtol=1e-6)
  assert curve[6] < curve[1]
  with pytest.raises(ValueError, match="lengths"):
    L.per_prompt_length(est, t, lengths=[0])
  with pytest.raises(ValueError, match="lengths"):
    L.per_prompt_length(est, t, lengths=[2.7])          # not silently n = 2
  with pytest.raises(ValueError, match="lengths"):
    L.per_prompt_length(est, t, lengths=[7])            # not silently the 6 demonstrations there are
  with pytest.raises(ValueError, match="task: expected an l2o_jax.Task"):
    L.per_prompt_length(est, tuple(t), lengths=[1])
  with pytest.raises(ValueError, match=r"lengths: expected at least one prompt length"):
    L.per_prompt_length(est, t, lengths=[])               # not silently {}
  with pytest.raises(ValueError, match=r"task.y_query: expected shape \(256,\)"):
    L.per_prompt_length(est, t._replace(y_query=t.y_query[:5]), lengths=[1])


def test_label_error_and_nmse_do_not_broadcast():
  y = jnp.array([1.0, 2.0, 3.0])
  assert float(L.label_error(y, y)) == 0.0
  with pytest.raises(ValueError, match=r"y_pred: expected the shape of y_true, \(3,\), got \(3, 1\)"):
    L.label_error(y, y[:, None])                          # would be a (3, 3) mean, 1.33
  with pytest.raises(ValueError, match="beta_hat: expected the shape of beta"):
    L.beta_nmse_db(np.ones((4, 1)), np.ones(4))
  with pytest.raises(ValueError, match=r"errors: expected a 1-D array"):
    L.median_error(np.ones((2, 3)))
  with pytest.raises(ValueError, match=r"errors: expected at least one task"):
    L.median_error(np.ones(0))
  with pytest.raises(ValueError, match=r"beta_hat: expected at least one task"):
    L.prediction_error(np.ones(0), np.ones((0, 3)), np.ones((0, 3)))      # not a silent NaN


def test_median_errors_count_nan_as_worst():
  # A NaN (overflowed) task counts as +inf: the median of [1, NaN, 0.5] is 1, not NaN or 0.75.
  assert float(L.median_error(jnp.array([1.0, jnp.nan, 0.5]))) == 1.0
  rng = np.random.default_rng(0)
  yq, xq, b = rng.normal(size=5), rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
  np.testing.assert_allclose(L.median_prediction_error(yq, xq, b),
                             np.median((yq - np.sum(xq * b, axis=1)) ** 2), rtol=1e-6)
  with pytest.raises(ValueError, match="x_query"):
    L.median_prediction_error(yq, xq[:, :2], b)


def test_mean_interval_draws_the_given_number_of_resamples():
  lo, hi = L.mean_interval(np.arange(10.0), resamples=1)   # one resample: a single mean, lo = hi
  assert lo == hi
