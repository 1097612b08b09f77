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

Everything is a pure function of a params pytree. The per-layer weights are stacked along a
leading axis and the blocks run under `lax.scan`, so a 12-layer model compiles one block.
The forward pass is batch-major (B, T, width): one fused QKV matmul per block over all
B * T tokens, which is what makes the train step fast (see benchmarks/RESULTS.md).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from l2o_jax import _checks

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
    Blocks hold ln1_g, ln1_b, qkv_w (width, 3 width), qkv_b, proj_w (width, width), proj_b,
    ln2_g, ln2_b, fc_w (width, 4 width), fc_b, out_w (4 width, width), out_b.
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
  k_in, k_pos, k_out, k_blocks = jax.random.split(key, 4)
  L, W = num_layers, width
  normal = lambda k, shape, std: std * jax.random.normal(k, shape, jnp.float32)
  # HF GPT2PreTrainedModel._init_weights: N(0, 0.02), and residual projections (c_proj)
  # scaled by 1/sqrt(2 n_layer); biases 0, LayerNorm (1, 0).
  kq, kp, kf, ko = jax.random.split(k_blocks, 4)
  resid_std = 0.02 / math.sqrt(2 * L)
  ones, zeros = jnp.ones((L, W), jnp.float32), jnp.zeros((L, W), jnp.float32)
  blocks = {
      "ln1_g": ones, "ln1_b": zeros,
      "qkv_w": normal(kq, (L, W, 3 * W), 0.02), "qkv_b": jnp.zeros((L, 3 * W), jnp.float32),
      "proj_w": normal(kp, (L, W, W), resid_std), "proj_b": zeros,
      "ln2_g": ones, "ln2_b": zeros,
      "fc_w": normal(kf, (L, W, 4 * W), 0.02), "fc_b": jnp.zeros((L, 4 * W), jnp.float32),
      "out_w": normal(ko, (L, 4 * W, W), resid_std), "out_b": zeros,
  }

  # torch.nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as in Garg et al.
  def linear(k, fan_in, shape_w, shape_b):
    kw, kb = jax.random.split(k)
    bound = 1.0 / math.sqrt(fan_in)
    return {"w": jax.random.uniform(kw, shape_w, jnp.float32, -bound, bound),
            "b": jax.random.uniform(kb, shape_b, jnp.float32, -bound, bound)}

  return {
      "read_in": linear(k_in, d, (d, W), (W,)),
      "wpe": normal(k_pos, (2 * max_points, W), 0.02),
      "blocks": blocks,
      "ln_f": {"g": jnp.ones((W,), jnp.float32), "b": jnp.zeros((W,), jnp.float32)},
      "read_out": linear(k_out, W, (W,), ()),
  }


def config(params) -> dict:
  """(d, max_points, num_layers, width) read off a params pytree (num_heads is not stored)."""
  d, width = np.shape(params["read_in"]["w"])
  return {"d": d, "max_points": np.shape(params["wpe"])[0] // 2,
          "num_layers": np.shape(params["blocks"]["qkv_w"])[0], "width": width}


def _check_params(params, num_heads):
  try:
    cfg = config(params)
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"params: expected a pytree from gpt2.init, got {type(params).__name__} "
                     f"({e!r})") from e
  num_heads = _checks.check_positive_int("num_heads", num_heads)
  if cfg["width"] % num_heads:
    raise ValueError(f"num_heads: expected a divisor of width={cfg['width']}, got {num_heads}")
  return cfg


def _check_batch(params, X, y, x_query, num_heads):
  """Shapes of a batch (B, n, d), (B, n), (B, d); returns (B, n, d)."""
  cfg = _check_params(params, num_heads)
  B, n, d = _checks.check_ndim("X", X, 3, "(B, n, d)")
  y_shape = _checks.check_ndim("y", y, 2, f"(B, n) = ({B}, {n}) matching X")
  q_shape = _checks.check_ndim("x_query", x_query, 2, f"(B, d) = ({B}, {d}) matching X")
  if y_shape != (B, n):
    raise ValueError(f"y: expected shape (B, n) = {(B, n)} to match X {(B, n, d)}, got {y_shape}")
  if q_shape != (B, d):
    raise ValueError(f"x_query: expected shape (B, d) = {(B, d)} to match X {(B, n, d)}, got {q_shape}")
  if d != cfg["d"]:
    raise ValueError(f"X: expected d = {cfg['d']} columns (the model's read-in), got shape {(B, n, d)}")
  if n + 1 > cfg["max_points"]:
    raise ValueError(f"X: expected n + 1 <= max_points = {cfg['max_points']} points, got n = {n} "
                     f"demonstrations (shape {(B, n, d)})")
  return B, n, d


def tokens(X, y, x_query):
  """The interleaved prompt (Garg et al. `_combine`): (B, 2n + 1, d) = x_1, [y_1, 0..], ..., x_{n+1}."""
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


def _block(h, p, num_heads, impl):
  B, T, W = h.shape
  a = _layer_norm(h, p["ln1_g"], p["ln1_b"])
  qkv = a @ p["qkv_w"] + p["qkv_b"]                      # one fused matmul over all B*T tokens
  q, k, v = jnp.split(qkv.reshape(B, T, 3, num_heads, W // num_heads), 3, axis=2)
  att = _attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], impl).reshape(B, T, W)
  h = h + att @ p["proj_w"] + p["proj_b"]
  m = _layer_norm(h, p["ln2_g"], p["ln2_b"])
  m = jax.nn.gelu(m @ p["fc_w"] + p["fc_b"], approximate=True)   # HF "gelu_new"
  return h + m @ p["out_w"] + p["out_b"]


def forward(params, tok, *, num_heads: int = 8, attention: str = "einsum", unroll: int = 1):
  """Unchecked batch forward pass: tokens (B, T, d) -> read-out at every token (B, T).

  attention: "einsum" (hand-written causal softmax), "xla" or "cudnn"
  (`jax.nn.dot_product_attention`); unroll: `lax.scan` unroll factor over the layers.
  """
  T = tok.shape[1]
  h = tok @ params["read_in"]["w"] + params["read_in"]["b"] + params["wpe"][:T]

  def body(h, p):
    return _block(h, p, num_heads, attention), None

  h, _ = lax.scan(body, h, params["blocks"], unroll=unroll)
  h = _layer_norm(h, params["ln_f"]["g"], params["ln_f"]["b"])
  return h @ params["read_out"]["w"] + params["read_out"]["b"]


def _predict_batch(params, X, y, x_query, **kw):
  out = forward(params, tokens(X, y, x_query), **kw)
  return out[:, ::2]   # the x tokens: positions 0, 2, ..., 2n


def predict_batch(params, X, y, x_query, *, num_heads: int = 8, attention: str = "einsum",
                  unroll: int = 1):
  """Predictions (B, n + 1) of y_1, ..., y_n, y_{n+1} for a batch X (B, n, d), y (B, n),
  x_query (B, d); entry i (0-based) is read at x_{i+1}'s token and sees only the prompt
  before it. Any n with n + 1 <= max_points. Jit-able; shape checks run at trace time."""
  _check_batch(params, X, y, x_query, num_heads)
  if attention not in ("einsum", "xla", "cudnn"):
    raise ValueError(f"attention: expected 'einsum', 'xla' or 'cudnn', got {attention!r}")
  return _predict_batch(params, X, y, x_query, num_heads=num_heads, attention=attention,
                        unroll=unroll)


def predict(params, X, y, x_query, *, num_heads: int = 8, attention: str = "einsum"):
  """Predictions (n + 1,) of y_1, ..., y_{n+1} for one instance X (n, d), y (n,), x_query (d,).

  The last entry is the prediction for the query x_{n+1}. Vmappable.
  """
  n, d = _checks.check_instance(X, y)
  q_shape = _checks.check_ndim("x_query", x_query, 1, f"(d,) = ({d},) matching X")
  if q_shape != (d,):
    raise ValueError(f"x_query: expected shape ({d},) to match X {(n, d)}, got {q_shape}")
  return predict_batch(params, X[None], y[None], x_query[None], num_heads=num_heads,
                       attention=attention)[0]


def loss(params, X, y, x_query, y_query, *, prefix: bool = True, num_heads: int = 8,
         attention: str = "einsum", unroll: int = 1):
  """Mean squared label error on a batch: over every prefix (y_1..y_{n+1}, Garg et al.'s
  training loss) when `prefix`, else at the query only."""
  pred = predict_batch(params, X, y, x_query, num_heads=num_heads, attention=attention,
                       unroll=unroll)
  if prefix:
    target = jnp.concatenate([y, y_query[:, None]], axis=1)
    return jnp.mean((pred - target) ** 2)
  return jnp.mean((pred[:, -1] - y_query) ** 2)
