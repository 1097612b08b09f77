"""The GPT-2 baseline of the paper's section 6 (Figure 1), in the layout of Garg et al. 2022.

The prompt (x_1, y_1, ..., x_n, y_n, x_{n+1}) becomes 2n + 1 tokens in R^d: x_i as is and y_i
as the vector [y_i, 0, ..., 0] (Garg et al., `models.py::_combine`). A linear read-in maps each
token to the model width, learned position embeddings are added, and a stack of HF-GPT-2
blocks follows:

  h <- h + Proj(CausalSoftmaxAttention(LN_1(h)))        (8 heads, pre-LayerNorm, eps 1e-5)
  h <- h + W_out gelu_tanh(W_fc LN_2(h) + b_fc) + b_out (hidden width 4 * width)

then a final LayerNorm and a linear read-out to R. The prediction of y_i is read at the token
of x_i (0-based token 2(i-1)), so it sees x_1..x_i and y_1..y_{i-1} only: `predict` returns
the n + 1 predictions (y_1, ..., y_n, y_{n+1}), the last one being the query's. Dropout is off.

Everything is a pure function of a params pytree, float32. The per-layer weights are stacked
along a leading axis and the blocks run under `lax.scan`, so a 12-layer model compiles one
block; under autodiff each block keeps only its matmul outputs (`remat`). The forward pass is
batch-major (B, T, width) with one fused QKV matmul per block over all B * T tokens. The
defaults (scan not unrolled, remat on, the hand-written causal softmax rather than
`jax.nn.dot_product_attention(implementation="xla")`) are the fastest on CPU by
`python -m benchmarks.micro --only=gpt2` (numbers in BUILD_NOTES); on GPU `attention="cudnn"`
is available. The whole step is matmul-bound: ~75 GFLOP per step.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from l2o_jax import _checks
from l2o_jax.ops import dense

LN_EPS = 1e-5  # HF GPT2Config.layer_norm_epsilon


def init(key, *, d: int, max_points: int, num_layers: int = 12, width: int = 256,
         num_heads: int = 8) -> dict:
  """GPT-2 parameters, initialised as HF `GPT2Model` and Garg et al.'s read-in/read-out.

  Args:
    key: a `jax.random.key`.
    d: token dimension (the x dimension).
    max_points: the largest number of points n + 1 (demonstrations plus the query) a prompt
      may hold; the position table has 2 * max_points rows, as in Garg et al.
    num_layers, width, num_heads: GPT-2 depth, embedding size and attention heads
      (paper: 12, 256, 8).

  Returns:
    {"read_in": {"w": (d, width), "b": (width,)}, "wpe": (2 max_points, width),
     "blocks": {name: (num_layers, ...)}, "ln_f": {"g", "b"}, "read_out": {"w": (width,), "b": ()}}.
    Blocks hold ln1_g, ln1_b, qkv_w (width, 3, num_heads, head_dim), qkv_b (3, num_heads,
    head_dim), proj_w (width, width), proj_b, ln2_g, ln2_b, fc_w (width, 4 width), fc_b,
    out_w (4 width, width), out_b. The fused QKV weight is HF's c_attn weight (width, 3 width)
    reshaped, so the number of heads is part of the parameters' shapes and cannot be mismatched.
  """
  d = _checks.check_positive_int("d", d)
  max_points = _checks.check_positive_int("max_points", max_points)
  num_layers = _checks.check_positive_int("num_layers", num_layers)
  width = _checks.check_positive_int("width", width)
  num_heads = _checks.check_positive_int("num_heads", num_heads)
  if width % num_heads:
    raise ValueError(f"width: expected a multiple of num_heads={num_heads}, got {width}")
  if isinstance(key, (int, np.integer)):
    raise ValueError(f"key: expected a jax.random.key, got the int {key}; use jax.random.key({key})")
  return _init(key, d=d, max_points=max_points, L=num_layers, W=width, num_heads=num_heads)


def _draw(key, sampler, shapes):
  """One random draw split into arrays of the given shapes: XLA:CPU spends about a second
  compiling each threefry call, so init draws everything with two calls, not twelve."""
  sizes = [math.prod(s) for s in shapes]
  flat = sampler(key, (sum(sizes),))
  parts = jnp.split(flat, np.cumsum(sizes)[:-1])
  return [p.reshape(s) for p, s in zip(parts, shapes)]


@functools.partial(jax.jit, static_argnames=("d", "max_points", "L", "W", "num_heads"))
def _init(key, *, d, max_points, L, W, num_heads):
  k_normal, k_uniform = jax.random.split(key)
  # HF GPT2PreTrainedModel._init_weights: N(0, 0.02), and residual projections (c_proj)
  # scaled by 1/sqrt(2 n_layer); biases 0, LayerNorm (1, 0).
  resid_std = 0.02 / math.sqrt(2 * L)
  qkv_w, proj_w, fc_w, out_w, wpe = _draw(
      k_normal, lambda k, s: jax.random.normal(k, s, jnp.float32),
      [(L, W, 3, num_heads, W // num_heads), (L, W, W), (L, W, 4 * W), (L, 4 * W, W),
       (2 * max_points, W)])
  ones, zeros = jnp.ones((L, W), jnp.float32), jnp.zeros((L, W), jnp.float32)
  blocks = {
      "ln1_g": ones, "ln1_b": zeros,
      "qkv_w": 0.02 * qkv_w, "qkv_b": jnp.zeros((L, 3, num_heads, W // num_heads), jnp.float32),
      "proj_w": resid_std * proj_w, "proj_b": zeros,
      "ln2_g": ones, "ln2_b": zeros,
      "fc_w": 0.02 * fc_w, "fc_b": jnp.zeros((L, 4 * W), jnp.float32),
      "out_w": resid_std * out_w, "out_b": zeros,
  }
  # Read-in and read-out: torch.nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))
  # for weight and bias, as in Garg et al.
  in_w, in_b, out_w1, out_b1 = _draw(k_uniform, lambda k, s: jax.random.uniform(k, s, jnp.float32, -1.0, 1.0),
                                     [(d, W), (W,), (W,), ()])
  return {
      "read_in": {"w": in_w / math.sqrt(d), "b": in_b / math.sqrt(d)},
      "wpe": 0.02 * wpe,
      "blocks": blocks,
      "ln_f": {"g": jnp.ones((W,), jnp.float32), "b": jnp.zeros((W,), jnp.float32)},
      "read_out": {"w": out_w1 / math.sqrt(W), "b": out_b1 / math.sqrt(W)},
  }


def config(params) -> dict:
  """{d, max_points, num_layers, width, num_heads} read off a params pytree's shapes."""
  d, width = np.shape(params["read_in"]["w"])
  L, _, _, num_heads, _ = np.shape(params["blocks"]["qkv_w"])
  return {"d": d, "max_points": np.shape(params["wpe"])[0] // 2, "num_layers": L,
          "width": width, "num_heads": num_heads}


def _check_params(params):
  try:
    return config(params)
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"params: expected a pytree from gpt2.init, got {type(params).__name__} "
                     f"({e!r})") from e


def _check_batch(params, X, y, x_query):
  """Shapes of a batch (B, n, d), (B, n), (B, d); returns (B, n, d)."""
  cfg = _check_params(params)
  B, n, d = _checks.check_ndim("X", X, 3, "(B, n, d)")
  y_shape = _checks.check_ndim("y", y, 2, f"(B, n) = ({B}, {n}) matching X")
  q_shape = _checks.check_ndim("x_query", x_query, 2, f"(B, d) = ({B}, {d}) matching X")
  if y_shape != (B, n):
    raise ValueError(f"y: expected shape (B, n) = {(B, n)} to match X {(B, n, d)}, got {y_shape}")
  if q_shape != (B, d):
    raise ValueError(f"x_query: expected shape (B, d) = {(B, d)} to match X {(B, n, d)}, got {q_shape}")
  _check_fits(cfg, n, d, (B, n, d))
  return B, n, d


def _check_fits(cfg, n, d, shape):
  """X's d matches the read-in and its n demonstrations plus the query fit the position table;
  `shape` is X's shape as the caller passed it (one instance or a batch)."""
  if d != cfg["d"]:
    raise ValueError(f"X: expected d = {cfg['d']} columns (the model's read-in), got shape {shape}")
  if n + 1 > cfg["max_points"]:
    raise ValueError(f"X: expected n + 1 <= max_points = {cfg['max_points']} points, got n = {n} "
                     f"demonstrations (shape {shape})")


def tokens(X, y, x_query):
  """The interleaved prompt (Garg et al. `_combine`): (B, 2n + 1, d) = x_1, [y_1, 0..], ..., x_{n+1}."""
  X, y, x_query = _checks.as_float(X, y, x_query)   # y's token takes X's dtype: not an int one
  B, n, d = X.shape
  y_tok = jnp.zeros_like(X).at[..., 0].set(y)
  pairs = jnp.stack([X, y_tok], axis=2).reshape(B, 2 * n, d)
  return jnp.concatenate([pairs, x_query[:, None, :]], axis=1)


def _layer_norm(h, g, b):
  mean = jnp.mean(h, axis=-1, keepdims=True)
  centred = h - mean
  var = jnp.mean(centred * centred, axis=-1, keepdims=True)
  return centred * lax.rsqrt(var + LN_EPS) * g + b


def _attention(q, k, v, impl):
  """Causal softmax attention on (B, T, heads, head_dim) arrays."""
  if impl == "xla":
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
  if impl == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
  T, head_dim = q.shape[1], q.shape[-1]
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (1.0 / math.sqrt(head_dim))
  causal = jnp.tril(jnp.ones((T, T), jnp.bool_))
  # A finite mask value (HF uses the dtype minimum) keeps the gradient free of NaNs.
  scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
  weights = jax.nn.softmax(scores, axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def _block(h, p, impl):
  B, T, W = h.shape
  a = _layer_norm(h, p["ln1_g"], p["ln1_b"])
  # One fused QKV matmul over all B*T tokens: (B, T, W) x (W, 3, heads, head_dim).
  # `dense`: the same matmul with a weight gradient XLA:CPU runs at full GEMM speed (ops.dense).
  qkv_w = p["qkv_w"]
  qkv = dense(a, qkv_w.reshape(W, -1)).reshape(B, T, *qkv_w.shape[1:]) + p["qkv_b"]
  att = _attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], impl).reshape(B, T, W)
  h = h + dense(att, p["proj_w"]) + p["proj_b"]
  m = _layer_norm(h, p["ln2_g"], p["ln2_b"])
  m = jax.nn.gelu(dense(m, p["fc_w"]) + p["fc_b"], approximate=True)   # HF "gelu_new"
  return h + dense(m, p["out_w"]) + p["out_b"]


def forward(params, tok, *, attention: str = "einsum", unroll: int = 1, remat: bool = True):
  """Unchecked batch forward pass: tokens (B, T, d) -> read-out at every token (B, T).

  attention: "einsum" (hand-written causal softmax), "xla" or "cudnn"
  (`jax.nn.dot_product_attention`); unroll: `lax.scan` unroll factor over the layers;
  remat: under autodiff, save only each block's matmul outputs and recompute its LayerNorms,
  GELU and softmax in the backward pass (fewer stacked residuals for the layer scan to write
  and read; identical gradients).
  """
  T = tok.shape[1]
  h = tok @ params["read_in"]["w"] + params["read_in"]["b"] + params["wpe"][:T]
  block = functools.partial(_block, impl=attention)
  if remat:
    block = jax.checkpoint(block, policy=jax.checkpoint_policies.dots_saveable)

  def body(h, p):
    return block(h, p), None

  h, _ = lax.scan(body, h, params["blocks"], unroll=unroll)
  h = _layer_norm(h, params["ln_f"]["g"], params["ln_f"]["b"])
  return h @ params["read_out"]["w"] + params["read_out"]["b"]


def _predict_batch(params, X, y, x_query, **kw):
  out = forward(params, tokens(X, y, x_query), **kw)
  return out[:, ::2]   # the x tokens: positions 0, 2, ..., 2n


def predict_batch(params, X, y, x_query, *, attention: str = "einsum", unroll: int = 1,
                  remat: bool = True):
  """Predictions (B, n + 1) of y_1, ..., y_n, y_{n+1} for a batch X (B, n, d), y (B, n),
  x_query (B, d); entry i (0-based) is read at x_{i+1}'s token and sees only the prompt
  before it. Any n with n + 1 <= max_points. Jit-able; shape checks run at trace time."""
  _check_batch(params, X, y, x_query)
  if attention not in ("einsum", "xla", "cudnn"):
    raise ValueError(f"attention: expected 'einsum', 'xla' or 'cudnn', got {attention!r}")
  X, y, x_query = _checks.as_float(X, y, x_query, like=params)
  return _predict_batch(params, X, y, x_query, attention=attention, unroll=unroll, remat=remat)


def predict(params, X, y, x_query, *, attention: str = "einsum"):
  """Predictions (n + 1,) of y_1, ..., y_{n+1} for one instance X (n, d), y (n,), x_query (d,).

  The last entry is the prediction for the query x_{n+1}. Vmappable.
  """
  n, d = _checks.check_instance(X, y)
  q_shape = _checks.check_ndim("x_query", x_query, 1, f"(d,) = ({d},) matching X")
  if q_shape != (d,):
    raise ValueError(f"x_query: expected shape ({d},) to match X {(n, d)}, got {q_shape}")
  _check_fits(_check_params(params), n, d, (n, d))
  X, y, x_query = _checks.as_float(X, y, x_query, like=params)
  return predict_batch(params, X[None], y[None], x_query[None], attention=attention)[0]


def loss(params, X, y, x_query, y_query, *, prefix: bool = True, attention: str = "einsum",
         unroll: int = 1, remat: bool = True):
  """Mean squared label error on a batch: over every prefix (y_1..y_{n+1}, Garg et al.'s
  training loss) when `prefix`, else at the query only."""
  pred = predict_batch(params, X, y, x_query, attention=attention, unroll=unroll, remat=remat)
  if prefix:
    target = jnp.concatenate([y, y_query[:, None]], axis=1)
    return jnp.mean((pred - target) ** 2)
  return jnp.mean((pred[:, -1] - y_query) ** 2)
