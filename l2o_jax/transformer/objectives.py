"""Training objectives and evaluation for the trained Transformers (section 6).

`model` is "small_tf" (this package, `small_tf.py`) or "gpt2" (`gpt2.py`, imported lazily).
Both predict y_hat_1..y_hat_{N+1} for one instance in one causal pass, the last being the query.
The paper's loss is the label loss at the query, sum_j (y_{N+1,j} - y_hat_{N+1,j})^2 over the
batch (section 6); we use its mean ("query"); "all" averages over every prefix (Garg et al.).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from l2o_jax import _checks
from l2o_jax.metrics import mean_interval, median_error
from l2o_jax.tasks import Task, check_task, sample_tasks
from l2o_jax.train import Objective
from l2o_jax.transformer.small_tf import READOUTS, small_tf_init, small_tf_predict
from l2o_jax.transformer.small_tf import _predict_batch as _small_tf_predict_batch
from l2o_jax.transformer.small_tf import _predict_query_batch as _small_tf_predict_query_batch

MODELS = ("small_tf", "gpt2")
LOSSES = ("query", "all")


def _check_model(model: str) -> str:
  if model not in MODELS:
    raise ValueError(f"model: expected one of {MODELS}, got {model!r}")
  return model


def _gpt2():
  from l2o_jax.transformer import gpt2  # engineer 4's module; optional until it exists
  return gpt2


def init_params(model: str, key, *, d: int = 20, n: int = 10, **model_kwargs):
  """Initial parameters. small_tf: `small_tf_init(key, d=d, **model_kwargs)` (n is unused: no
  positional encoding). gpt2: `gpt2.init(key, d=d, max_points=n + 1, **model_kwargs)`."""
  _check_model(model)
  if model == "small_tf":
    _checks.check_keywords("model_kwargs", model_kwargs, small_tf_init, exclude=("key", "d"))
    return small_tf_init(key, d=d, **model_kwargs)
  model_kwargs.pop("readout", None)  # GPT-2 always reads out linearly
  _checks.check_keywords("model_kwargs", model_kwargs, _gpt2().init, exclude=("key", "d"))
  model_kwargs.setdefault("max_points", n + 1)
  return _gpt2().init(key, d=d, **model_kwargs)


def _check_score_clip(model: str, score_clip):
  """score_clip is Small TF's (`ops.attention_weights`); GPT-2 has softmax attention."""
  score_clip = _checks.check_score_clip(score_clip)
  if score_clip is not None and model != "small_tf":
    raise ValueError(f"score_clip: only Small TF's ReLU attention takes a cap, got {score_clip} for {model!r}")
  return score_clip


def predict(model: str, params, X, y, x_query, *, score_clip=None) -> jax.Array:
  """(N+1,) predictions for one instance (X (N, d), y (N,), x_query (d,)); the last is the query.
  score_clip: Small TF's attention-weight cap (None: the paper's model; `ops.attention_weights`)."""
  _check_model(model)
  score_clip = _check_score_clip(model, score_clip)
  if model == "small_tf":
    return small_tf_predict(params, X, y, x_query, score_clip=score_clip)
  return _gpt2().predict(params, X, y, x_query)


def _predict_batch(model: str, params, X, y, x_query, score_clip=None) -> jax.Array:
  """(B, N+1) predictions for a batch, unchecked (the objective's hot path)."""
  if model == "small_tf":
    return _small_tf_predict_batch(params, X, y, x_query, score_clip=score_clip)
  return _gpt2()._predict_batch(params, X, y, x_query)


def _predict_query_batch(model: str, params, X, y, x_query, score_clip=None) -> jax.Array:
  """(B,) query predictions, `_predict_batch(...)[:, -1]`; Small TF skips the work no other
  token needs (`small_tf._predict_query_batch`), GPT-2 takes the full pass."""
  if model == "small_tf":
    return _small_tf_predict_query_batch(params, X, y, x_query, score_clip=score_clip)
  return _predict_batch(model, params, X, y, x_query)[:, -1]


def make_objective(model: str, *, d: int = 20, n: int = 10, s: int = 3, support=None,
                   batch: int = 64, readout: str = "query", loss_on: str = "query",
                   noise_std: float = 0.0, score_clip=None, **model_kwargs) -> Objective:
  """A `train.Objective`: fresh tasks every step (section 6), squared label loss.

  Args:
    model: "small_tf" or "gpt2".
    d, n, s, support, noise_std: the task distribution (`sample_tasks`); support=10 is Figure 1b.
    batch: tasks per step (paper: 64).
    readout: Small TF read-out, one of 'query', 'linear', 'query_dagger' (ignored for gpt2).
    loss_on: "query" = mean_b (y_{N+1} - y_hat_{N+1})^2 (the paper's); "all" = mean over every
      prefix i = 1..N+1 of (y_i - y_hat_i)^2.
    score_clip: Small TF only: None (the paper's ReLU attention) or c > 0, every attention
      weight capped at c (`ops.attention_weights`; not the paper's model, a remedy for its
      exploding prompts: BUILD_NOTES "Training stability"). Evaluate with the same cap.
    model_kwargs: passed to `init_params` (e.g. num_layers, out_scale for small_tf).
  """
  _check_model(model)
  score_clip = _check_score_clip(model, score_clip)
  if loss_on not in LOSSES:
    raise ValueError(f"loss_on: expected one of {LOSSES}, got {loss_on!r}")
  if model == "small_tf":
    if readout not in READOUTS:
      raise ValueError(f"readout: expected one of {READOUTS}, got {readout!r}")
    model_kwargs["readout"] = readout
  batch = _checks.check_positive_int("batch", batch)

  def init(key):
    return init_params(model, key, d=d, n=n, **dict(model_kwargs))

  # Validate the task distribution and the model's settings now (a misspelt or impossible
  # model_kwargs would otherwise surface at the first init): eval_shape runs every Python check
  # while tracing, without compiling or computing anything.
  jax.eval_shape(lambda k: sample_tasks(k, 1, d=d, n=n, s=s, support=support, noise_std=noise_std),
                 jax.random.key(0))
  jax.eval_shape(init, jax.random.key(0))

  def sample(key):
    return sample_tasks(key, batch, d=d, n=n, s=s, support=support, noise_std=noise_std)

  def loss(params, task: Task):
    # Batch-major forward passes: each weight meets all B * T tokens in one GEMM, and the weight
    # gradients of `ops.dense` stay single GEMMs (under vmap they would be B small ones).
    if loss_on == "query":
      pred = _predict_query_batch(model, params, task.X, task.y, task.x_query, score_clip)
      return jnp.mean((task.y_query - pred) ** 2)
    preds = _predict_batch(model, params, task.X, task.y, task.x_query, score_clip)
    targets = jnp.concatenate([task.y, task.y_query[:, None]], axis=1)
    return jnp.mean((targets - preds) ** 2)

  return Objective(init, sample, loss)


@functools.lru_cache(maxsize=None)
def _prefix_errors_fn(model: str, score_clip=None):
  def one(params, X, y, x_query, y_query):
    N = X.shape[0]

    # The query prediction with only the first n demonstrations: the model is causal, so token
    # 2n+1 sees exactly (x_1, y_1, ..., x_n, y_n, x_{n+1}); putting x_query in row n+1 makes
    # that token the query of the length-n prompt. One pass per n, one compile for all n.
    def with_n(n):
      Xn = jnp.where((jnp.arange(N) == n)[:, None], x_query[None], X)
      return predict(model, params, Xn, y, x_query, score_clip=score_clip)[n]

    preds = jax.vmap(with_n)(jnp.arange(N + 1))
    return (y_query - preds) ** 2

  def errors(params, task):
    # Chunks of 64 instances bound the memory: one pass per prompt length keeps (N+1) copies of
    # every prompt's attention scores, ~2 GB per layer for 4096 prompts of 20 demonstrations.
    per_task = jax.lax.map(lambda t: one(params, *t), (task.X, task.y, task.x_query, task.y_query),
                           batch_size=64)
    return jnp.mean(per_task, axis=0), median_error(per_task[:, -1]), per_task[:, -1]

  return jax.jit(errors)


def evaluate(model: str, params, task: Task, *, score_clip=None) -> dict:
  """Query prediction error of a trained model on a batch of tasks, overall and per prompt length.

  Returns {"pred_error": mean (y_query - y_hat_query)^2 with all N demonstrations,
           "pred_error_median": the median over tasks of the same (robust to a few exploding
             prompts, which the LayerNorm-free Small TF can produce),
           "pred_error_ci95": (lo, hi) the bootstrap 95% interval of the mean over tasks
             (`l2o_jax.metrics.mean_interval`),
           "per_prompt_length": {n: the same mean with only the first n demonstrations, n = 1..N}},
  the Transformer counterpart of `l2o_jax.metrics.per_prompt_length` (same targets).
  score_clip: the Small TF attention-weight cap the params were trained with (`make_objective`).
  """
  _check_model(model)
  score_clip = _check_score_clip(model, score_clip)
  B, N, d = check_task(task)
  if N < 1:
    raise ValueError(f"task.X: expected at least one demonstration, got shape {(B, N, d)}")
  # Argument checks, outside jit; eval_shape runs them at trace time without computing anything.
  jax.eval_shape(lambda p, t: predict(model, p, t.X[0], t.y[0], t.x_query[0], score_clip=score_clip),
                 params, task)
  errs, median, final = _prefix_errors_fn(model, score_clip)(params, task)
  errs = np.asarray(errs)
  return {"pred_error": float(errs[N]), "pred_error_median": float(median),
          "pred_error_ci95": mean_interval(final),
          "per_prompt_length": {n: float(errs[n]) for n in range(1, N + 1)}}
