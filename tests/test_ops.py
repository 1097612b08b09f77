"""soft_threshold, masked ReLU attention (Def. 3.1) and ReLU MLP (Def. 3.2) against plain loops."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import l2o_jax as L


def test_soft_threshold_elementwise():
  rng = np.random.default_rng(0)
  x = rng.normal(size=200).astype(np.float32) * 2
  for theta in (0.0, 0.3, 1.7):
    ref = np.array([np.sign(v) * max(abs(v) - theta, 0.0) for v in x], np.float32)
    np.testing.assert_allclose(L.soft_threshold(x, theta), ref, atol=1e-6)
  # Vector thresholds broadcast elementwise.
  th = np.abs(rng.normal(size=200)).astype(np.float32)
  ref = np.sign(x) * np.maximum(np.abs(x) - th, 0)
  np.testing.assert_allclose(L.soft_threshold(x, th), ref, atol=1e-6)


def test_soft_threshold_of_integers_is_float():
  assert float(L.soft_threshold(3, 0.5)) == 2.5
  np.testing.assert_array_equal(L.soft_threshold(jnp.array([-2, 0, 3]), 1.5), [-0.5, 0.0, 1.5])


def test_soft_threshold_negative_theta():
  with pytest.raises(ValueError, match="theta: expected values >= 0"):
    L.soft_threshold(np.ones(3), -0.1)


def attention_loop(H, Q, K, V, clip=None):
  """Definition 3.1, token by token: h_i + sum_m sum_{j<=i} (1/i) ReLU(<Q_m h_i, K_m h_j>) V_m h_j
  (with `clip`, each weight min(ReLU(score), clip))."""
  D, T = H.shape
  out = H.astype(np.float64).copy()
  for i in range(T):
    for m in range(Q.shape[0]):
      for j in range(i + 1):
        score = float((Q[m] @ H[:, i]) @ (K[m] @ H[:, j]))
        weight = max(score, 0.0) if clip is None else min(max(score, 0.0), clip)
        out[:, i] += weight / (i + 1) * (V[m] @ H[:, j])
  return out


def test_masked_relu_attention_matches_loop():
  rng = np.random.default_rng(1)
  D, T, M = 6, 7, 3
  H = rng.normal(size=(D, T)).astype(np.float32)
  Q, K, V = (rng.normal(size=(M, D, D)).astype(np.float32) * 0.5 for _ in range(3))
  ref = attention_loop(H, Q, K, V)
  out = L.masked_relu_attention(H, {"Q": Q, "K": K, "V": V})
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  # The list-of-(V, Q, K) form is the same layer.
  out2 = L.masked_relu_attention(H, [(V[m], Q[m], K[m]) for m in range(M)])
  np.testing.assert_allclose(out2, out, rtol=1e-6, atol=1e-6)
  # jit equals no jit.
  out3 = jax.jit(L.masked_relu_attention)(H, {"Q": Q, "K": K, "V": V})
  np.testing.assert_allclose(out3, out, rtol=1e-6, atol=1e-6)
  # Capped weights (score_clip; not the paper's model) against the loop with the cap.
  capped = L.masked_relu_attention(H, {"Q": Q, "K": K, "V": V}, score_clip=0.5)
  np.testing.assert_allclose(capped, attention_loop(H, Q, K, V, clip=0.5), rtol=1e-5, atol=1e-5)
  assert np.abs(capped - out).max() > 0.1
  with pytest.raises(ValueError, match="score_clip: expected None or a number > 0, got -1"):
    L.masked_relu_attention(H, {"Q": Q, "K": K, "V": V}, score_clip=-1)


def test_attention_is_causal():
  rng = np.random.default_rng(2)
  D, T, M = 5, 6, 2
  H = rng.normal(size=(D, T)).astype(np.float32)
  heads = {k: rng.normal(size=(M, D, D)).astype(np.float32) for k in "QKV"}
  H2 = H.copy()
  H2[:, 4:] += 10.0
  a, b = L.masked_relu_attention(H, heads), L.masked_relu_attention(H2, heads)
  np.testing.assert_allclose(a[:, :4], b[:, :4], rtol=1e-6)
  assert not np.allclose(a[:, 4:], b[:, 4:])


def test_relu_mlp_matches_loop():
  rng = np.random.default_rng(3)
  D, Dh, T = 5, 9, 4
  H = rng.normal(size=(D, T)).astype(np.float32)
  W1 = rng.normal(size=(Dh, D)).astype(np.float32)
  W2 = rng.normal(size=(D, Dh)).astype(np.float32)
  b = rng.normal(size=Dh).astype(np.float32)
  ref = np.stack([H[:, i] + W2 @ np.maximum(W1 @ H[:, i] + b, 0) for i in range(T)], 1)
  np.testing.assert_allclose(L.relu_mlp(H, W1, W2, b), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call, match", [
    (lambda: L.masked_relu_attention(np.ones(4), {"Q": np.ones((1, 4, 4)), "K": np.ones((1, 4, 4)), "V": np.ones((1, 4, 4))}), "H: expected a 2-D"),
    (lambda: L.masked_relu_attention(np.ones((4, 3)), {"Q": np.ones((1, 5, 5)), "K": np.ones((1, 5, 5)), "V": np.ones((1, 5, 5))}), r"heads\['Q'\]: expected shape \(M, 4, 4\)"),
    (lambda: L.masked_relu_attention(np.ones((4, 3)), {"Q": np.ones((1, 4, 4))}), "heads: expected keys"),
    (lambda: L.relu_mlp(np.ones((4, 3)), np.ones((8, 5)), np.ones((4, 8)), np.ones(8)), "W1: expected shape"),
    (lambda: L.relu_mlp(np.ones((4, 3)), np.ones((8, 4)), np.ones((4, 8)), np.ones(7)), "b: expected shape"),
    (lambda: L.soft_threshold(np.ones(3), np.ones(2)), r"theta: expected a scalar or a shape that broadcasts to x's \(3,\)"),
    (lambda: L.soft_threshold(np.ones(3), np.ones((2, 3))), r"theta: .* got \(2, 3\)"),
    (lambda: L.causal_mask(-1), "T: expected an integer >= 0"),
    (lambda: L.causal_mask(2.5), "T: expected an integer >= 0"),
    (lambda: L.causal_mask(3, jnp.int32), "dtype: expected a floating dtype"),   # 1/i would be 0
    (lambda: L.masked_relu_attention(np.ones((4, 3)), [(np.eye(4), np.eye(4), np.eye(3))]),
     r"heads\[0\]: expected K of shape \(4, 4\)"),
])
def test_bad_input(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_dense_matches_matmul_and_its_gradients():
  from l2o_jax.ops import dense
  x = jax.random.normal(jax.random.key(0), (3, 5, 4))
  w = jax.random.normal(jax.random.key(1), (4, 6))
  g = jax.random.normal(jax.random.key(2), (3, 5, 6))
  np.testing.assert_allclose(dense(x, w), x @ w, rtol=1e-6)
  f = lambda fn: jax.grad(lambda x, w: jnp.sum(fn(x, w) * g), argnums=(0, 1))(x, w)
  for a, b in zip(f(dense), f(lambda x, w: x @ w)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bmm_matches_einsum_and_its_gradients():
  from l2o_jax.ops import bmm
  a = jax.random.normal(jax.random.key(0), (3, 5, 4))
  b = jax.random.normal(jax.random.key(1), (3, 4, 6))
  g = jax.random.normal(jax.random.key(2), (3, 5, 6))
  ref = lambda a, b: jnp.einsum("bpq,bqr->bpr", a, b)
  np.testing.assert_allclose(bmm(a, b), ref(a, b), rtol=1e-5, atol=1e-6)
  ours = jax.grad(lambda a, b: jnp.sum(bmm(a, b) * g), argnums=(0, 1))(a, b)
  theirs = jax.grad(lambda a, b: jnp.sum(ref(a, b) * g), argnums=(0, 1))(a, b)
  for x, y in zip(ours, theirs):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


def test_dense_and_bmm_custom_gradients_only_for_cpu(monkeypatch):
  # The copies and barriers work around XLA:CPU's GEMMs; on a GPU/TPU default backend both ops
  # are plain matmuls whose gradients XLA forms itself.
  from l2o_jax import ops
  x, w = jnp.ones((6, 4)), jnp.ones((4, 3))
  a, b = jnp.ones((2, 5, 4)), jnp.ones((2, 4, 3))
  loss = lambda f: jax.grad(lambda *args: jnp.sum(f(*args)), argnums=(0, 1))
  has_custom = lambda f, *args: "optimization_barrier" in str(jax.make_jaxpr(loss(f))(*args))
  assert has_custom(ops.dense, x, w) and has_custom(ops.bmm, a, b)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert not has_custom(ops.dense, x, w) and not has_custom(ops.bmm, a, b)
  np.testing.assert_allclose(ops.dense(x, w), x @ w)
  for got, want in zip(loss(ops.bmm)(a, b), loss(lambda a, b: a @ b)(a, b)):
    np.testing.assert_allclose(got, want)


def test_dense_and_bmm_inside_shard_map():
  """A replicated operand with a per-device one (data parallelism by shard_map): the custom VJPs
  must return gradients typed like their inputs, summed over devices as plain matmuls' are."""
  from functools import partial
  from jax.sharding import Mesh, PartitionSpec as P
  from l2o_jax.ops import bmm, dense
  mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
  x = jax.random.normal(jax.random.key(0), (6, 4))
  w = jax.random.normal(jax.random.key(1), (4, 3))
  b = jax.random.normal(jax.random.key(2), (1, 4, 3))
  cases = [(lambda w, x: dense(x, w), lambda w, x: x @ w, w, x),     # replicated weight, split x
           (bmm, lambda a, b: a @ b, x[None], b)]                       # replicated a, split b
  for ours, plain, u, v in cases:
    grads = jax.jit(partial(jax.shard_map, mesh=mesh, in_specs=(P(), P("x")), out_specs=(P(), P("x")))(
        jax.grad(lambda u, v: jnp.sum(ours(u, v) ** 2), argnums=(0, 1))))
    ref = jax.grad(lambda u, v: jnp.sum(plain(u, v) ** 2), argnums=(0, 1))(u, v)
    for got, want in zip(grads(u, v), ref):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_micro_benchmark_dense_smoke():
  from benchmarks import micro
  rows = micro.bench_dense(1, T=8, K=4, N=6)
  assert {"ops.dense"} <= set(rows) and all(lo > 0 for lo, _ in rows.values())


def test_profile_places_sync_events_in_their_enclosing_hlo_op():
  """benchmarks.profile's synchronisation table: each Rendezvous / Wait event is charged to the
  innermost enclosing HLO op on its own thread (not another thread's, not a non-HLO span)."""
  from benchmarks.profile import _sync_by_enclosing_op
  ev = lambda name, ts, dur, tid=1: {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": tid}
  events = [ev("ThunkExecutor::Execute", 0, 100), ev("all-reduce.1", 10, 50), ev("Rendezvous", 12, 40),
            ev("Wait: pending_threads=1/2", 15, 30), ev("fusion.3", 70, 20), ev("Wait: pending_threads=1/2", 75, 4),
            ev("Rendezvous", 200, 6), ev("all-reduce.1", 0, 500, tid=2)]
  out = _sync_by_enclosing_op(events, {"all-reduce.1", "fusion.3"}, steps=2)
  assert dict(out) == pytest.approx({("Rendezvous", "all-reduce"): 0.02, ("Wait: pending_threads=1/2", "all-reduce"): 0.015,
                                     ("Wait: pending_threads=1/2", "fusion"): 0.002, ("Rendezvous", "(none)"): 0.003})
