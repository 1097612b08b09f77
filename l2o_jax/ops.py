"""The building blocks of paper section 3.1: soft-thresholding, masked ReLU attention
(Definition 3.1) and the token-wise ReLU MLP (Definition 3.2).

Sequences follow the paper's layout: H is (D, T), one token per *column*.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from l2o_jax import _checks


def soft_threshold(x, theta):
  """S_theta(x) = sign(x) max(|x| - theta, 0), elementwise (section 4.2).

  `theta` is a scalar or broadcasts to x's shape; it must be >= 0. Integer x is computed in float
  (S_0.5(3) = 2.5). Written as x - clip(x, -theta, theta) so the gradient w.r.t. theta is defined
  everywhere (useful when theta is learned).
  """
  _checks.check_nonnegative("theta", theta)
  x = jnp.asarray(x)
  x_shape, t_shape = x.shape, _checks.shape_of("theta", theta)
  try:
    ok = jnp.broadcast_shapes(t_shape, x_shape) == x_shape
  except ValueError:
    ok = False
  if not ok:
    raise ValueError(f"theta: expected a scalar or a shape that broadcasts to x's {x_shape}, got {t_shape}")
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    x = x.astype(_checks.float_dtype(x))
  theta = jnp.asarray(theta, x.dtype)
  return x - jnp.clip(x, -theta, theta)


def causal_mask(T: int, dtype=jnp.float32) -> jax.Array:
  """mask(.) of Definition 3.1 as a (T, T) matrix: entry (j, i) is 1/i for j <= i (1-indexed).
  dtype must be floating: the weights 1/i would round to 0 in an integer type."""
  T = _checks.check_positive_int("T", T, minimum=0)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"dtype: expected a floating dtype for the 1/i weights, got {jnp.dtype(dtype).name}")
  j = jnp.arange(T)[:, None]
  i = jnp.arange(T)[None, :]
  return jnp.where(j <= i, 1.0 / (i + 1.0), 0.0).astype(dtype)


def _stack_heads(heads, D: int):
  """Accepts {"Q","K","V"} stacked (M, D, D) arrays or a sequence of (V, Q, K) triples."""
  if isinstance(heads, Mapping):
    missing = {"Q", "K", "V"} - set(heads)
    if missing:
      raise ValueError(f"heads: expected keys 'Q', 'K', 'V' with shape (M, D, D), missing {sorted(missing)}")
    Q, K, V = heads["Q"], heads["K"], heads["V"]
  elif isinstance(heads, Sequence) and len(heads) > 0:
    for m, h in enumerate(heads):
      if len(h) != 3:
        raise ValueError(f"heads[{m}]: expected a (V, Q, K) triple, got {len(h)} items")
      for name, A in zip("VQK", h):
        if _checks.shape_of(f"heads[{m}]", A) != (D, D):
          raise ValueError(f"heads[{m}]: expected {name} of shape ({D}, {D}) for H with D={D} rows, "
                           f"got {_checks.shape_of(f'heads[{m}]', A)}")
    V = jnp.stack([h[0] for h in heads])
    Q = jnp.stack([h[1] for h in heads])
    K = jnp.stack([h[2] for h in heads])
  else:
    raise ValueError("heads: expected a dict {'Q','K','V'} of (M, D, D) arrays or a non-empty list of (V, Q, K)")
  for name, A in (("Q", Q), ("K", K), ("V", V)):
    shape = _checks.shape_of(f"heads['{name}']", A)
    if len(shape) != 3 or shape[1:] != (D, D):
      raise ValueError(f"heads['{name}']: expected shape (M, {D}, {D}) for H with D={D} rows, got {shape}")
  counts = [_checks.shape_of("heads", A)[0] for A in (Q, K, V)]
  if len(set(counts)) != 1:
    raise ValueError(f"heads: expected the same number of heads in Q, K, V, got {', '.join(map(str, counts))}")
  return Q, K, V


def masked_relu_attention(H, heads, *, score_clip=None):
  """M-head masked ReLU attention, Definition 3.1.

  Attn(H) = H + sum_m (V_m H) mask(ReLU((K_m H)^T (Q_m H))), i.e. for token i (1-indexed)
  h_i + sum_m sum_{j<=i} (1/i) ReLU((Q_m h_i)^T (K_m h_j)) V_m h_j.

  Args:
    H: (D, T) input sequence, tokens as columns.
    heads: {"Q": (M, D, D), "K": (M, D, D), "V": (M, D, D)} or a list of (V_m, Q_m, K_m).
    score_clip: None (Definition 3.1) or c > 0: each weight min(ReLU(score), c) instead
      (`attention_weights`; not the paper's model).
  Returns:
    (D, T) output sequence.
  """
  D, T = _checks.check_ndim("H", H, 2, "(D, T) with tokens as columns")
  score_clip = _checks.check_score_clip(score_clip)
  Q, K, V = _stack_heads(heads, D)
  return _attention(*_checks.as_float(H, Q, K, V), score_clip)


def attention_weights(scores, score_clip=None):
  """ReLU(scores) (Definition 3.1), or min(ReLU(scores), score_clip).

  The cap is not the paper's model. ReLU attention has no softmax normalisation, so a block's
  output is cubic in its tokens and, without LayerNorm, a few large prompts can overflow a
  12-block Small TF; capping each weight makes the attention at most linear in the tokens
  (`experiments.small_tf_stability`, BUILD_NOTES "Training stability"). score_clip is static
  (None or a Python float)."""
  if score_clip is None:
    return jax.nn.relu(scores)
  return jnp.clip(scores, 0.0, score_clip)


def _attention(H, Q, K, V, score_clip=None):
  # scores[m, j, i] = (K_m h_j) . (Q_m h_i) = h_j^T (K_m^T Q_m) h_i: keys index rows, queries
  # columns, as in Def. 3.1. Folding K_m^T Q_m into one D x D matrix (independent of H, so a
  # vmapped batch computes it once) replaces two per-token projections by one.
  A = jnp.einsum("med,mef->mdf", K, Q)
  scores = jnp.einsum("dj,mdi->mji", H, A @ H)
  weights = attention_weights(scores, score_clip) * causal_mask(H.shape[1], H.dtype)
  return H + jnp.einsum("mej,mji->ei", V @ H, weights)


def dense(x, w):
  """x @ w for x (..., K) and w (K, N): a matmul whose weight gradient is fast on XLA:CPU.

  The weight gradient x^T g contracts the token axis, the leading (major) dimension of both
  operands. XLA folds that transpose into the dot, and XLA:CPU's fast GEMM path (YNNPACK) does
  not take such a dot. `dense` makes the narrower token-major operand a real transposed copy (an
  optimization barrier stops XLA from folding it back), so the weight gradient is a canonical
  GEMM. Same arithmetic, same float32 results. `python -m benchmarks.micro --only=dense` times it
  against the default.

  Inside `jax.shard_map`, a replicated w used with a per-device x is first marked varying
  (`lax.pcast`), so its gradient is summed over devices as plain `x @ w`'s would be.

  On other backends `dense` is plain `x @ w` (`tracing_for_cpu`).
  """
  if not tracing_for_cpu():
    return x @ w
  return _dense(*_same_varying_axes(x, w))


def tracing_for_cpu() -> bool:
  """Whether programs are being traced for the CPU (the default backend): the one switch for the
  layout choices tuned to XLA:CPU. Here: `dense` and `bmm` take their custom gradients only on
  the CPU; GPUs and TPUs take transposed operands natively (cuBLAS's transpose flags), so there
  the copies and barriers would only add kernels to a step, and plain autodiff is used. Small TF's
  causal query blocks (`small_tf._causal_blocks`) use it too."""
  return jax.default_backend() == "cpu"


def _vma(x) -> frozenset:
  """The shard_map mesh axes x varies over (empty outside shard_map)."""
  return frozenset(jax.typeof(x).manual_axis_type.varying)


def _same_varying_axes(a, b):
  """(a, b), each marked varying over the shard_map axes the other varies over: a custom VJP
  must return each gradient typed like its input, and JAX's own transpose of the cast then sums
  the gradient of a replicated operand over devices."""
  va, vb = _vma(a), _vma(b)
  if va - vb:
    b = jax.lax.pcast(b, tuple(sorted(va - vb)), to="varying")
  if vb - va:
    a = jax.lax.pcast(a, tuple(sorted(vb - va)), to="varying")
  return a, b


@jax.custom_vjp
def _dense(x, w):
  return x @ w


def _dense_fwd(x, w):
  return x @ w, (x, w)


def _dense_bwd(res, g):
  x, w = res
  K, N = w.shape
  x2, g2 = x.reshape(-1, K), g.reshape(-1, N)
  # Transpose the narrower of the two token-major operands (copies T * min(K, N)). The barriers
  # around the products keep them canonical: XLA would otherwise fold a transpose of the result
  # (here for N < K, or a caller's w = W.T, as Small TF's MLP) into the GEMM, which then leaves
  # YNNPACK's path (an Eigen dot: ~2 of ~40 ms a Small TF step at batch 32 on one core, in an
  # ad-hoc profile; BUILD_NOTES).
  barrier = jax.lax.optimization_barrier
  if N < K:
    dw = barrier(barrier(g2.T) @ x2).T
  else:
    dw = barrier(barrier(x2.T) @ g2)
  return g @ w.T, dw


_dense.defvjp(_dense_fwd, _dense_bwd)


def bmm(a, b):
  """Batched a @ b for a (B, P, Q), b (B, Q, R), whose gradients are canonical GEMMs on XLA:CPU.

  The gradient for b, a^T g, contracts a's leading (row) axis; left to XLA it is a
  transposed-operand dot that XLA:CPU runs outside YNNPACK (an Eigen dot: ~2 of ~35 ms a Small
  TF step at batch 32 on one core, ad hoc; BUILD_NOTES). Here a is transposed into a real copy
  first, as in `dense`.
  Works inside `jax.shard_map` as `dense` does; plain `einsum` off the CPU, as `dense`.
  """
  if not tracing_for_cpu():
    return jnp.einsum("bpq,bqr->bpr", a, b)
  return _bmm(*_same_varying_axes(a, b))


@jax.custom_vjp
def _bmm(a, b):
  return jnp.einsum("bpq,bqr->bpr", a, b)


def _bmm_fwd(a, b):
  return _bmm(a, b), (a, b)


def _bmm_bwd(res, g):
  a, b = res
  a_t = jax.lax.optimization_barrier(jnp.swapaxes(a, 1, 2))
  return jnp.einsum("bpr,bqr->bpq", g, b), jnp.einsum("bqp,bpr->bqr", a_t, g)


_bmm.defvjp(_bmm_fwd, _bmm_bwd)


def relu_mlp(H, W1, W2, b):
  """Token-wise residual ReLU MLP, Definition 3.2: h_i + W2 ReLU(W1 h_i + b).

  Args:
    H: (D, T) sequence; W1: (D', D); W2: (D, D'); b: (D',).
  """
  D, _ = _checks.check_ndim("H", H, 2, "(D, T) with tokens as columns")
  Dh, D1 = _checks.check_ndim("W1", W1, 2, "(D', D)")
  if D1 != D:
    raise ValueError(f"W1: expected shape (D', {D}) to match H's {D} rows, got {(Dh, D1)}")
  w2 = _checks.check_ndim("W2", W2, 2, f"({D}, {Dh})")
  if w2 != (D, Dh):
    raise ValueError(f"W2: expected shape ({D}, {Dh}), got {w2}")
  if _checks.shape_of("b", b) != (Dh,):
    raise ValueError(f"b: expected shape ({Dh},), got {_checks.shape_of('b', b)}")
  return _mlp(*_checks.as_float(H, W1, W2, b))


def _mlp(H, W1, W2, b):
  return H + W2 @ jax.nn.relu(W1 @ H + b[:, None])
