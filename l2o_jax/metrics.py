"""Metrics of paper section 6: label prediction error, beta NMSE, per-prompt-length curves."""
from __future__ import annotations

import numbers
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from l2o_jax import _checks
from l2o_jax.tasks import Task, check_task


def prediction_error(y_query, x_query, beta_hat):
  """Mean over tasks of (y_query - x_query^T beta_hat)^2; shapes (B,), (B, d), (B, d)."""
  return jnp.mean(prediction_errors(y_query, x_query, beta_hat))


def prediction_errors(y_query, x_query, beta_hat):
  """(B,) per-task (y_query - x_query^T beta_hat)^2 (what `prediction_error` averages; the input
  of `median_error` and `mean_interval`); shapes (B,), (B, d), (B, d)."""
  B, d = _checks.check_ndim("beta_hat", beta_hat, 2, "(B, d)")
  if B == 0:   # the mean over no tasks would be a silent NaN
    raise ValueError("beta_hat: expected at least one task, got shape (0, d)")
  if _checks.shape_of("x_query", x_query) != (B, d):
    raise ValueError(f"x_query: expected shape ({B}, {d}) to match beta_hat, got {_checks.shape_of('x_query', x_query)}")
  if _checks.shape_of("y_query", y_query) != (B,):
    raise ValueError(f"y_query: expected shape ({B},), got {_checks.shape_of('y_query', y_query)}")
  return _squared_errors(*_checks.as_float(y_query, x_query, beta_hat))


def _squared_errors(y_query, x_query, beta_hat):
  return (y_query - jnp.einsum("bd,bd->b", x_query, beta_hat)) ** 2


def median_error(errors):
  """Median over tasks of per-task squared errors (B,); a NaN (an overflowed prediction) counts
  as +inf, the worst error, instead of poisoning the median. Robust to a few exploding tasks,
  whose squared errors dominate the mean."""
  if _checks.check_ndim("errors", errors, 1, "(B,) of per-task squared errors") == (0,):
    raise ValueError("errors: expected at least one task, got shape (0,)")
  errors, = _checks.as_float(errors)
  return jnp.median(jnp.where(jnp.isnan(errors), jnp.inf, errors))


def mean_interval(errors, *, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
  """Bootstrap percentile interval of the mean of per-task errors (B,): resample the tasks with
  replacement `resamples` times and take the (1 - level)/2 and (1 + level)/2 quantiles of the
  resampled means. Section 6's errors are heavy-tailed (a few tasks can carry almost all of the
  mean; `experiments.spread --tails`), so the interval says how far another test set of the same
  size could move a reported mean; with very heavy tails it is itself optimistic, a lower bound
  on that spread.
  NaN errors count as +inf (an interval of (.., inf)). Host-side NumPy, deterministic in `seed`."""
  _checks.check_ndim("errors", errors, 1, "(B,) of per-task squared errors")
  if not 0 < level < 1:
    raise ValueError(f"level: expected a probability in (0, 1), got {level!r}")
  resamples = _checks.check_positive_int("resamples", resamples)
  e = np.asarray(errors, np.float64)
  e = np.where(np.isnan(e), np.inf, e)
  if e.size == 0:
    raise ValueError("errors: expected at least one task, got shape (0,)")
  rng = np.random.default_rng(seed)
  means = np.concatenate([e[rng.integers(0, e.size, (min(256, resamples - i), e.size))].mean(1)
                          for i in range(0, resamples, 256)])      # chunks bound the index memory
  # Order statistics, not interpolation: an inf mean (a NaN task resampled) stays inf, not NaN.
  lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2], method="inverted_cdf")
  return float(lo), float(hi)


def median_prediction_error(y_query, x_query, beta_hat):
  """`prediction_error`'s median counterpart: median over tasks of (y_query - x_query^T beta_hat)^2."""
  return median_error(prediction_errors(y_query, x_query, beta_hat))


def label_error(y_true, y_pred):
  """Mean squared label error for methods that predict y directly (the Transformers); y_true and
  y_pred must have the same shape (no broadcasting: a (B, 1) prediction against (B,) labels is
  an error, not a (B, B) mean)."""
  _same_shape("y_pred", y_pred, "y_true", y_true)
  y_true, y_pred = _checks.as_float(y_true, y_pred)
  return jnp.mean((y_true - y_pred) ** 2)


def _same_shape(name, a, ref_name, ref):
  a_shape, ref_shape = _checks.shape_of(name, a), _checks.shape_of(ref_name, ref)
  if a_shape != ref_shape:
    raise ValueError(f"{name}: expected the shape of {ref_name}, {ref_shape}, got {a_shape}")


def beta_nmse_db(beta_hat, beta):
  """10 log10( sum ||beta_hat - beta||^2 / sum ||beta||^2 ) over the batch, in dB."""
  _same_shape("beta_hat", beta_hat, "beta", beta)
  beta_hat, beta = _checks.as_float(beta_hat, beta)
  return 10.0 * jnp.log10(jnp.sum((beta_hat - beta) ** 2) / jnp.sum(beta ** 2))


def batched(solver: Callable, **kwargs) -> Callable:
  """vmap a single-instance solver `solver(X, y, **kwargs) -> beta` over (B, n, d), (B, n)."""
  return jax.jit(jax.vmap(lambda X, y: solver(X, y, **kwargs)))


def per_prompt_length(estimate: Callable, task: Task, lengths: Iterable[int] | None = None) -> dict[int, float]:
  """Prediction error of a beta estimator when it sees only the first n demonstrations.

  Args:
    estimate: batched estimator `(X (B, n, d), y (B, n)) -> beta_hat (B, d)` (e.g. `batched(ista,
      lam=0.1, num_iters=12)`); it is called once per n, so it compiles once per length.
    task: a batch of tasks with N demonstrations.
    lengths: the prompt lengths n to evaluate (default 1..N).
  Returns:
    {n: mean (y_query - x_query^T beta_hat)^2}.
  """
  _, N, _ = check_task(task)
  lengths = list(range(1, N + 1)) if lengths is None else list(lengths)
  if not lengths:
    raise ValueError(f"lengths: expected at least one prompt length in [1, {N}], got none")
  for n in lengths:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= N:
      raise ValueError(f"lengths: expected every n in [1, {N}] (the task's demonstrations), got {n}")
  out = {}
  for n in lengths:
    beta_hat = estimate(task.X[:, :n], task.y[:, :n])
    out[int(n)] = float(prediction_error(task.y_query, task.x_query, beta_hat))
  return out
