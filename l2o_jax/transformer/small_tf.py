"""The paper's Transformer (section 3.1, Definition 3.3) and the trained "Small TF" (section 6).

`transformer_forward` is K blocks of masked ReLU attention (Definition 3.1, the 1/i causal
mask) followed by the residual ReLU MLP (Definition 3.2): no LayerNorm, no positional encoding,
no softmax. The explicit LISTA-VM weights (`construction.py`) and the trained Small TF share it.

Small TF parameters are a plain pytree:
  {"body": {"attn": {"Q","K","V": (K, M, D, D)}, "mlp": {"W1": (K, D', D), "W2": (K, D, D'), "b": (K, D')}},
   "v": (D,)        -- linear read-out (Definition 4.1), or
   "V": (D, d)      -- query read-out (Definition 4.2), or
   neither          -- query-dagger read-out (fixed V of Corollary E.1, no parameters)}
The read-out kind is read off the pytree's structure, so it is static under jit.
"""
from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
from jax import lax

from l2o_jax import _checks
from l2o_jax.ops import _attention, _mlp, attention_weights, bmm, causal_mask, dense, tracing_for_cpu
from l2o_jax.transformer import readout as ro
from l2o_jax.transformer.embedding import _embed, dim_from_D, embed, model_dim

READOUTS = ("linear", "query", "query_dagger")


def _check_body(params) -> tuple[int, int, int, int]:
  """Validates transformer_forward params; returns (K, M, D, D')."""
  try:
    Q, K, V = (params["attn"][k] for k in ("Q", "K", "V"))
    W1, W2, b = (params["mlp"][k] for k in ("W1", "W2", "b"))
  except (KeyError, TypeError) as e:
    raise ValueError("params: expected {'attn': {'Q','K','V': (K, M, D, D)}, "
                     "'mlp': {'W1': (K, D', D), 'W2': (K, D, D'), 'b': (K, D')}}, "
                     f"missing {e}") from None
  q = _checks.check_ndim("params['attn']['Q']", Q, 4, "(K, M, D, D)")
  L, M, D, D2 = q
  if D != D2:
    raise ValueError(f"params['attn']['Q']: expected (K, M, D, D), got shape {q}")
  for name, A in (("K", K), ("V", V)):
    if _checks.shape_of(name, A) != q:
      raise ValueError(f"params['attn']['{name}']: expected shape {q} like Q, got {_checks.shape_of(name, A)}")
  w1 = _checks.check_ndim("params['mlp']['W1']", W1, 3, f"(K, D', D) = ({L}, D', {D})")
  if w1[0] != L or w1[2] != D:
    raise ValueError(f"params['mlp']['W1']: expected shape ({L}, D', {D}), got {w1}")
  Dh = w1[1]
  if _checks.shape_of("W2", W2) != (L, D, Dh):
    raise ValueError(f"params['mlp']['W2']: expected shape ({L}, {D}, {Dh}), got {_checks.shape_of('W2', W2)}")
  if _checks.shape_of("b", b) != (L, Dh):
    raise ValueError(f"params['mlp']['b']: expected shape ({L}, {Dh}), got {_checks.shape_of('b', b)}")
  return L, M, D, Dh


def transformer_forward(params, H, *, return_all: bool = False, score_clip=None) -> jax.Array:
  """K blocks of TF_Theta (Definition 3.3): H <- MLP(Attn(H)), lax.scan over the blocks.

  Args:
    params: {"attn": {"Q","K","V": (K, M, D, D)}, "mlp": {"W1": (K, D', D), "W2": (K, D, D'), "b": (K, D')}}.
    H: (D, T) input sequence (e.g. `embed(X, y, x_query)`), tokens as columns.
    return_all: also return every block's output.
    score_clip: None (Definition 3.1) or c > 0 to cap every attention weight at c
      (`ops.attention_weights`; not the paper's model).
  Returns:
    (D, T) the output H^(K+1), or (K, D, T) with entry k-1 = H^(k+1) when return_all.
  """
  _, _, D, _ = _check_body(params)
  shape = _checks.check_ndim("H", H, 2, "(D, T) with tokens as columns")
  if shape[0] != D:
    raise ValueError(f"H: expected {D} rows to match params (D = {D}), got shape {shape}")
  H, = _checks.as_float(H, like=params)
  return _forward(params, H, return_all=return_all, score_clip=_checks.check_score_clip(score_clip))


def _forward(params, H, *, return_all=False, score_clip=None):
  def block(H, p):
    a, m = p["attn"], p["mlp"]
    H = _mlp(_attention(H, a["Q"], a["K"], a["V"], score_clip), m["W1"], m["W2"], m["b"])
    return H, (H if return_all else None)

  H_out, all_H = lax.scan(block, H, params)
  return all_H if return_all else H_out


def _head_stacks(a):
  """A block's heads as two matrices for token rows h (row layout):
  A_s (D, M D): h @ A_s = (A_m h)_m with A_m = K_m^T Q_m, so score(j -> i) = h_j^T A_m h_i
  (Definition 3.1, the K^T Q fold of ops._attention);
  V_t (M D, D): z @ V_t = sum_m V_m z_m for z = (z_m)_m, rows ordered (m, d)."""
  M, D, _ = a["Q"].shape
  A = jnp.einsum("med,mef->mdf", a["K"], a["Q"])
  return (jnp.transpose(A, (2, 0, 1)).reshape(D, M * D),
          jnp.transpose(a["V"], (0, 2, 1)).reshape(M * D, D))


# The masked score matrix is lower triangular, so on a CPU the attention products run over query
# blocks, each only against the keys up to its last query (the 1/i mask zeroes the rest): at
# T = 21 two blocks do 331 of the 441 (query, key) pairs per head, 0-9% off the CPU train step per
# run (`python -m benchmarks.micro --only=small_tf_chunk`, BUILD_NOTES); more blocks there are no
# faster (smaller products, more copies). Longer prompts gain from more: about one block per
# CPU_TOKENS_PER_BLOCK tokens, at least CPU_MIN_CAUSAL_BLOCKS (T = 81: 4 blocks, T = 161: 8, each
# 4-13% faster than 2 per step: `... --n=40 --causal-blocks=2,4` and `--n=80 --causal-blocks=2,4,8`).
# Elsewhere one block: a GPU's tiny batched products are launch-bound, so splitting them would
# only add kernels (unmeasured).
CPU_MIN_CAUSAL_BLOCKS = 2
CPU_TOKENS_PER_BLOCK = 20
CPU_CAUSAL_BLOCKS = None   # an int forces that many blocks on the CPU (benchmarks.micro's A/B)


def _causal_blocks(blocks, T):
  """Query blocks for T tokens: `blocks` when given, else the backend's default (above)."""
  if blocks is not None:
    return blocks
  if not tracing_for_cpu():
    return 1
  if CPU_CAUSAL_BLOCKS is not None:
    return CPU_CAUSAL_BLOCKS
  return max(CPU_MIN_CAUSAL_BLOCKS, round(T / CPU_TOKENS_PER_BLOCK))


def _masked_values(G, H, mask, blocks, score_clip=None):
  """Z (B, T M, D), rows (i, m): sum_{j <= i} mask[i, j] ReLU(g_im . h_j) h_j (Definition 3.1 before
  V_m), with g_im = A_m h_i = G[b, i, m]. Query tokens in `blocks` contiguous groups (None: the
  backend's default, `_causal_blocks`); group [lo, hi) needs keys j < hi only. `score_clip`: see
  `ops.attention_weights` (None: the paper's ReLU)."""
  B, T, M, D = G.shape
  blocks = _causal_blocks(blocks, T)
  edges = sorted({round(T * k / blocks) for k in range(blocks + 1)})
  Z = []
  for lo, hi in zip(edges[:-1], edges[1:]):
    Hk = H[:, :hi]
    weights = attention_weights(jnp.einsum("bimd,bjd->bimj", G[:, lo:hi], Hk), score_clip) * mask[lo:hi, :, :hi]
    # sum_m V_m sum_j w_mij h_j: the tokens are aggregated per head first, then one GEMM applies
    # every V_m (in _block_rows). Aggregating V_m h_j instead costs the same FLOPs, but its
    # backward pass needs the (B, T, M, D) values transposed (~5% slower per step on CPU).
    Z.append(bmm(weights.reshape(B, (hi - lo) * M, hi), Hk))
  return Z[0] if len(Z) == 1 else jnp.concatenate(Z, axis=1)


def _block_rows(H, p, mask, causal_blocks=None, score_clip=None):
  """One block (Definition 3.3) on H (B, T, D); mask[i, ., j] = 1/i for j <= i."""
  B, T, D = H.shape
  a, m = p["attn"], p["mlp"]
  M = a["Q"].shape[0]
  A_s, V_t = _head_stacks(a)
  # G holds A_m h_i for every token and head, so the scores are batched (T M, D) x (D, T)
  # products per instance.
  G = dense(H, A_s).reshape(B, T, M, D)
  Z = _masked_values(G, H, mask, causal_blocks, score_clip).reshape(B, T, M * D)
  H = H + dense(Z, V_t)
  Zm = jax.nn.relu(dense(H, m["W1"].T) + m["b"])
  return H + dense(Zm, m["W2"].T)


def _forward_rows(params, H, unroll=True, causal_blocks=None, score_clip=None):
  """`_forward` for a batch in token-major layout: H (B, T, D) -> (B, T, D). Same blocks.

  For training: every projection is one GEMM over all B * T tokens through `ops.dense` (whose
  weight gradient is a canonical GEMM on XLA:CPU), instead of B small (D, D) x (D, T) products
  under vmap. The layer loop is unrolled: a scan stacks every block's residuals for the
  backward pass into zero-initialised buffers, which cost ~20% of the CPU train step
  (BUILD_NOTES; `unroll` is `lax.scan`'s, for the A/B in benchmarks/micro.py). Equal to
  `jax.vmap(_forward)` up to float32 rounding (tests/test_transformer.py). `score_clip` caps the
  attention weights (`ops.attention_weights`; None, the default, is the paper's model).
  """
  T = H.shape[1]
  mask = causal_mask(T, H.dtype).T[:, None, :]   # [i, ., j] = 1/i for j <= i (Definition 3.1)
  block = lambda H, p: (_block_rows(H, p, mask, causal_blocks, score_clip), None)
  return lax.scan(block, H, params, unroll=unroll)[0]


def _query_block_rows(H, p, score_clip=None):
  """The block of `_block_rows` evaluated at the last token only: (B, T, D) -> (B, D).
  The query attends to every token (its mask row is 1/T), so keys and values use all of H."""
  B, T, D = H.shape
  a, m = p["attn"], p["mlp"]
  M = a["Q"].shape[0]
  A_s, V_t = _head_stacks(a)
  hq = H[:, -1]
  g = (hq @ A_s).reshape(B, M, D)
  weights = attention_weights(jnp.einsum("bmd,bjd->bmj", g, H), score_clip) * (1.0 / T)
  z = jnp.einsum("bmj,bjd->bmd", weights, H).reshape(B, M * D)
  hq = hq + z @ V_t
  return hq + jax.nn.relu(hq @ m["W1"].T + m["b"]) @ m["W2"].T


def _embed_rows(X, y, x_query):
  return jnp.swapaxes(jax.vmap(_embed)(X, y, x_query), 1, 2)       # (B, T, D)


def _predict_batch(params, X, y, x_query, unroll=True, causal_blocks=None, score_clip=None):
  """(B, N+1) predictions for a batch X (B, N, d), y (B, N), x_query (B, d); unchecked.
  `jax.vmap(_predict)` with the blocks run by `_forward_rows` (the training objective's hot path)."""
  H_out = jnp.swapaxes(_forward_rows(params["body"], _embed_rows(X, y, x_query), unroll, causal_blocks,
                                     score_clip), 1, 2)  # (B, D, T)
  return jax.vmap(_readout, in_axes=(None, 0, 0, 0))(params, H_out, X, x_query)


def _predict_query_batch(params, X, y, x_query, unroll=True, causal_blocks=None, score_clip=None):
  """(B,) query predictions, `_predict_batch(...)[:, -1]` at ~1/K less work: the query loss reads
  only the last token, so the last block runs for that token alone (the causal mask means no
  earlier token's output depends on it). Unchecked."""
  body = params["body"]
  first = jax.tree_util.tree_map(lambda x: x[:-1], body)
  last = jax.tree_util.tree_map(lambda x: x[-1], body)
  H = _forward_rows(first, _embed_rows(X, y, x_query), unroll, causal_blocks, score_clip)
  hq = _query_block_rows(H, last, score_clip)   # (B, D)
  # The read-out of the single query token: the prompt "X" with no demonstrations makes X_tilde
  # the query row alone (Definition 4.2), so the same dispatch serves every read-out.
  return jax.vmap(_readout, in_axes=(None, 0, 0, 0))(params, hq[:, :, None], X[:, :0], x_query)[:, 0]


def readout_kind(params) -> str:
  """'linear', 'query' or 'query_dagger', from the Small TF pytree's keys."""
  if not isinstance(params, dict) or "body" not in params:
    raise ValueError("params: expected Small TF params {'body': ..., and 'v' | 'V' | neither}, "
                     f"got {type(params).__name__}{' with keys ' + str(sorted(params)) if isinstance(params, dict) else ''}")
  if "v" in params and "V" in params:
    raise ValueError("params: expected at most one read-out ('v' linear or 'V' query), got both")
  unknown = set(params) - {"body", "v", "V"}
  if unknown:
    raise ValueError(f"params: unexpected keys {sorted(unknown)}; Small TF params are {{'body', and 'v' "
                     "(linear read-out) | 'V' (query read-out) | neither (query-dagger)}")
  return "linear" if "v" in params else "query" if "V" in params else "query_dagger"


def _check_readout(readout: str) -> str:
  if readout not in READOUTS:
    raise ValueError(f"readout: expected one of {READOUTS}, got {readout!r}")
  return readout


def small_tf_init(key, *, d: int = 20, num_layers: int = 12, num_heads: int = 4,
                  mlp_hidden: int | None = None, readout: str = "query",
                  qk_scale: float = 1.0, out_scale: float = 0.1) -> dict:
  """Random Small TF parameters (section 6: 12 layers, 4 heads, D = 2d + 2 = 42).

  Initialisation (no LayerNorm, so each block must start close to the identity):
    Q, K ~ N(0, qk_scale^2 / D): scores (Q h_i)^T (K h_j) of order |h|^2 / sqrt(D);
    V ~ N(0, out_scale^2 / (D M K)) and W2 ~ N(0, out_scale^2 / (D' K)): the residual branches
      start small and their sum over K blocks stays O(out_scale), whatever the depth;
    W1 ~ N(0, 2 / D) (He), b = 0;
    read-out v ~ N(0, 1 / D), V ~ N(0, 1 / (D d)).

  Args:
    key: a jax.random.key.
    d: the dimension of beta*; D = 2d + 2.
    num_layers: K blocks. num_heads: M heads per block.
    mlp_hidden: D' (default 4D, the construction's width).
    readout: 'query' (Definition 4.2), 'linear' (Definition 4.1) or 'query_dagger' (Corollary E.1).
  """
  d = _checks.check_positive_int("d", d)
  L = _checks.check_positive_int("num_layers", num_layers)
  M = _checks.check_positive_int("num_heads", num_heads)
  D = model_dim(d)
  Dh = 4 * D if mlp_hidden is None else _checks.check_positive_int("mlp_hidden", mlp_hidden)
  _check_readout(readout)
  for name, s in (("qk_scale", qk_scale), ("out_scale", out_scale)):
    if isinstance(s, bool) or not isinstance(s, numbers.Real) or not 0 <= s < math.inf:
      raise ValueError(f"{name}: expected a finite float >= 0, got {s!r}")
  _checks.check_key("key", key)
  kq, kk, kv, k1, k2, kr = jax.random.split(key, 6)
  normal = lambda k, shape, std: std * jax.random.normal(k, shape, jnp.float32)
  body = {
      "attn": {"Q": normal(kq, (L, M, D, D), qk_scale / math.sqrt(D)),
               "K": normal(kk, (L, M, D, D), qk_scale / math.sqrt(D)),
               "V": normal(kv, (L, M, D, D), out_scale / math.sqrt(D * M * L))},
      "mlp": {"W1": normal(k1, (L, Dh, D), math.sqrt(2.0 / D)),
              "W2": normal(k2, (L, D, Dh), out_scale / math.sqrt(Dh * L)),
              "b": jnp.zeros((L, Dh), jnp.float32)},
  }
  params = {"body": body}
  if readout == "linear":
    params["v"] = normal(kr, (D,), 1.0 / math.sqrt(D))
  elif readout == "query":
    params["V"] = normal(kr, (D, d), 1.0 / math.sqrt(D * d))
  return params


def _check_small_tf(params) -> tuple[str, int]:
  kind = readout_kind(params)
  _, _, D, _ = _check_body(params["body"])
  d = dim_from_D(D)
  if kind == "linear" and _checks.shape_of("v", params["v"]) != (D,):
    raise ValueError(f"params['v']: expected shape ({D},), got {_checks.shape_of('v', params['v'])}")
  if kind == "query" and _checks.shape_of("V", params["V"]) != (D, d):
    raise ValueError(f"params['V']: expected shape ({D}, {d}), got {_checks.shape_of('V', params['V'])}")
  return kind, d


def small_tf_predict(params, X, y, x_query, *, score_clip=None) -> jax.Array:
  """(N+1,) predictions y_hat_1..y_hat_{N+1}; y_hat_i is read at token 2i-1 (has seen i-1
  demonstrations), so y_hat_{N+1} is the query prediction. Single instance; vmap for batches.

  X: (N, d); y: (N,); x_query: (d,). N is free: the model has no positional encoding.
  score_clip: None (the paper's model) or the cap on every attention weight that the params
  were trained with (`ops.attention_weights`).
  """
  _, d = _check_small_tf(params)
  score_clip = _checks.check_score_clip(score_clip)
  H = embed(X, y, x_query)  # checks X, y, x_query
  if H.shape[0] != model_dim(d):
    raise ValueError(f"X: expected d = {d} columns to match params (D = {model_dim(d)}), got "
                     f"{_checks.shape_of('X', X)[1]}")
  return _predict(params, *_checks.as_float(X, y, x_query, like=params), score_clip)


def _predict(params, X, y, x_query, score_clip=None):
  return _readout(params, _forward(params["body"], _embed(X, y, x_query), score_clip=score_clip), X, x_query)


def _readout(params, H, X, x_query):
  """The read-out named by the params pytree, applied to the output sequence H (D, 2N+1)."""
  kind = readout_kind(params)
  if kind == "linear":
    return ro._linear(params["v"], H)
  Xt = ro.x_tilde(X, x_query)
  if kind == "query":
    return ro._query(params["V"], H, Xt)
  return ro._query_dagger(H, Xt)


def small_tf_from_construction(lista_vm_params, bound, readout: str = "query", *, support=None) -> dict:
  """Small TF params whose forward pass is LISTA-VM (Theorem 4.1) and whose read-out gives
  y_hat_i = x_i^T beta_{2i-1}^{(K+1)} (Corollary E.1).

  readout: 'query' (V = V^dagger as a trainable matrix) or 'query_dagger'. A linear read-out
  cannot express x_i^T beta (it is bilinear), so 'linear' is rejected.
  support: prior support set for LISTA-VM-SS (Corollary D.1), as in `construct_lista_vm_transformer`.
  """
  from l2o_jax.transformer.construction import construct_lista_vm_transformer
  _check_readout(readout)
  if readout == "linear":
    raise ValueError("readout: expected 'query' or 'query_dagger'; a linear read-out v^T h cannot "
                     "produce x^T beta from the constructed sequence (Theorem 5.2 needs an extra layer)")
  body = construct_lista_vm_transformer(lista_vm_params, bound, support=support)
  params = {"body": body}
  if readout == "query":
    d = lista_vm_params["M"].shape[-1]
    params["V"] = ro.query_dagger_matrix(d, body["attn"]["Q"].dtype)
  return params


try:  # A thin flax.nnx wrapper for users who want a Module; training uses the pure pytree.
  from flax import nnx

  class SmallTF(nnx.Module):
    """nnx view of a Small TF: `SmallTF(d=20, rngs=nnx.Rngs(0))(X, y, x_query) -> (N+1,)`.

    Holds the same arrays as `small_tf_init` as nnx.Params; `to_params()` / `from_params()`
    convert to and from the pure pytree used by `small_tf_predict` and the training loop.
    score_clip: the attention-weight cap (`ops.attention_weights`; None, the paper's model).
    """

    def __init__(self, *, d: int | None = None, num_layers: int | None = None,
                 num_heads: int | None = None, mlp_hidden: int | None = None,
                 readout: str | None = None, rngs=None, params=None, score_clip=None, **init_kw):
      self.score_clip = _checks.check_score_clip(score_clip)
      _checks.check_keywords("init_kw", init_kw, small_tf_init,
                             exclude=("key", "d", "num_layers", "num_heads", "mlp_hidden", "readout"))
      given = {k: v for k, v in dict(d=d, num_layers=num_layers, num_heads=num_heads,
                                     mlp_hidden=mlp_hidden, readout=readout, **init_kw).items()
               if v is not None}
      if params is None:
        if rngs is None:   # as nnx.Linear: a silent fixed key would make every model the same
          raise ValueError("rngs: expected nnx.Rngs to initialise the parameters (e.g. rngs=nnx.Rngs(0)), "
                           "got None; or pass params=")
        key = rngs.params()
        # Defaults: the paper's Small TF, d = 20, 12 blocks, 4 heads, query read-out.
        params = small_tf_init(key, **{"d": 20, "num_layers": 12, "num_heads": 4, "readout": "query",
                                       **given})
      elif given:   # the arrays define the model; an ignored d= or readout= would mislead
        raise ValueError(f"params: the model comes from params, so {sorted(given)} cannot be set too; "
                         "pass either params or the init arguments")
      self.readout = readout_kind(params)
      a, m = params["body"]["attn"], params["body"]["mlp"]
      self.Q, self.K, self.V = nnx.Param(a["Q"]), nnx.Param(a["K"]), nnx.Param(a["V"])
      self.W1, self.W2, self.b = nnx.Param(m["W1"]), nnx.Param(m["W2"]), nnx.Param(m["b"])
      ro_arr = params.get("v", params.get("V"))
      self.readout_weight = nnx.Param(ro_arr) if ro_arr is not None else None

    @classmethod
    def from_params(cls, params, score_clip=None) -> "SmallTF":
      return cls(params=params, score_clip=score_clip)

    def to_params(self) -> dict:
      val = lambda p: p[...]
      params = {"body": {"attn": {"Q": val(self.Q), "K": val(self.K), "V": val(self.V)},
                         "mlp": {"W1": val(self.W1), "W2": val(self.W2), "b": val(self.b)}}}
      if self.readout == "linear":
        params["v"] = val(self.readout_weight)
      elif self.readout == "query":
        params["V"] = val(self.readout_weight)
      return params

    def __call__(self, X, y, x_query):
      return small_tf_predict(self.to_params(), X, y, x_query, score_clip=self.score_clip)

except ImportError:  # pragma: no cover - flax is a core dependency
  SmallTF = None
