"""transformer_forward (Definitions 3.1-3.3), read-outs (Definitions 4.1, 4.2, Corollary E.1),
the Small TF and its objectives. Small shapes; every reference is computed independently."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from l2o_jax import lista, sample_tasks
from l2o_jax.metrics import mean_interval
from l2o_jax.transformer import small_tf as stf
from l2o_jax.transformer import (SmallTF, embed, evaluate, init_params, linear_readout,
                                 make_objective, predict, query_dagger_readout, query_readout,
                                 readout_kind, small_tf_from_construction, small_tf_init,
                                 small_tf_predict, transformer_forward, x_tilde)

d, N = 4, 5
D = 2 * d + 2

# Eager JAX compiles every primitive on first use; the checks below jit whole computations
# instead (one compile each), which keeps this module's run time down on CI's 2 cores.


@pytest.fixture(scope="module")
def task():
  return jax.jit(lambda k: sample_tasks(k, 8, d=d, n=N, s=2))(jax.random.key(0))


@pytest.fixture(scope="module")
def tf_params():
  # out_scale 1 so that every block changes the sequence visibly.
  return jax.jit(lambda k: small_tf_init(k, d=d, num_layers=3, num_heads=2, mlp_hidden=7, out_scale=1.0))(
      jax.random.key(1))


@pytest.fixture(scope="module")
def batch_predict():
  return jax.jit(jax.vmap(small_tf_predict, in_axes=(None, 0, 0, 0)))


@pytest.fixture(scope="module")
def forward():
  return jax.jit(transformer_forward)


def _numpy_forward(params, H, clip=None):
  """Definitions 3.1-3.3 token by token, float64; `clip` caps each attention weight (not the
  paper's model: small_tf's score_clip)."""
  H = np.asarray(H, np.float64)
  a = {k: np.asarray(v, np.float64) for k, v in params["attn"].items()}
  m = {k: np.asarray(v, np.float64) for k, v in params["mlp"].items()}
  T = H.shape[1]
  for k in range(a["Q"].shape[0]):
    out = H.copy()
    for i in range(T):
      for h in range(a["Q"].shape[1]):
        q = a["Q"][k, h] @ H[:, i]
        for j in range(i + 1):
          w = max(q @ (a["K"][k, h] @ H[:, j]), 0.0)
          w = w if clip is None else min(w, clip)
          out[:, i] += w / (i + 1) * (a["V"][k, h] @ H[:, j])
    H = out + m["W2"][k] @ np.maximum(m["W1"][k] @ out + m["b"][k][:, None], 0.0)
  return H


def test_forward_matches_token_loop(task, tf_params, forward):
  H = embed(task.X[0], task.y[0], task.x_query[0])
  body = tf_params["body"]
  got = forward(body, H)
  want = _numpy_forward(body, H)
  assert np.abs(want - np.asarray(H)).max() > 0.1  # the blocks do something
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  all_H = jax.jit(lambda p, H: transformer_forward(p, H, return_all=True))(body, H)
  assert all_H.shape == (3, D, 2 * N + 1)
  np.testing.assert_allclose(all_H[-1], got, rtol=1e-6, atol=1e-6)


def test_decoder_mask_later_tokens_do_not_leak(task, tf_params, forward):
  H = embed(task.X[0], task.y[0], task.x_query[0])
  body = tf_params["body"]
  base = np.asarray(forward(body, H))
  for i in (0, 3, 7):
    noise = jax.random.normal(jax.random.key(i), H.shape) * 5.0
    H2 = H.at[:, i + 1:].add(noise[:, i + 1:])
    out = np.asarray(forward(body, H2))
    np.testing.assert_allclose(out[:, :i + 1], base[:, :i + 1], rtol=1e-5, atol=1e-5)
    assert np.abs(out[:, i + 1:] - base[:, i + 1:]).max() > 1e-2


def test_readouts_match_definitions():
  rng = np.random.default_rng(0)
  H = rng.standard_normal((D, 2 * N + 1)).astype(np.float32)
  Xt = rng.standard_normal((N + 1, d)).astype(np.float32)
  v = rng.standard_normal(D).astype(np.float32)
  V = rng.standard_normal((D, d)).astype(np.float32)
  lin, qry, dag = linear_readout(v, H), query_readout(V, H, Xt), query_dagger_readout(H, Xt)
  for out in (lin, qry, dag):
    assert out.shape == (N + 1,)
  for i in range(N + 1):  # y_hat_{i+1} from token 2i+1 (1-indexed)
    h = H[:, 2 * i]
    np.testing.assert_allclose(lin[i], v @ h, rtol=1e-5)
    np.testing.assert_allclose(qry[i], h @ V @ Xt[i], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dag[i], h[d + 1:2 * d + 1] @ Xt[i], rtol=1e-4, atol=1e-5)


def test_small_tf_from_construction_reproduces_lista_vm(task):
  params = lista.lista_vm_init(jax.random.key(2), 4, d, n=N, lam=0.05)
  X, y, q = task.X[1], task.y[1], task.x_query[1]
  Xt = np.asarray(x_tilde(X, q))
  want = np.array([0.0] + [Xt[i] @ np.asarray(lista.lista_vm(params, X[:i], y[:i])) for i in range(1, N + 1)])
  assert np.abs(want).max() > 0.1
  for readout in ("query", "query_dagger"):
    tf = small_tf_from_construction(params, 1e4, readout=readout)
    assert readout_kind(tf) == readout
    np.testing.assert_allclose(jax.jit(small_tf_predict)(tf, X, y, q), want, rtol=1e-4, atol=1e-5)


def test_init_shapes_and_readout_kinds():
  # shapes only: eval_shape traces the initialiser without running it
  p = jax.eval_shape(small_tf_init, jax.random.key(0))  # the paper's Small TF: d = 20, 12 layers, 4 heads, D = 42
  assert p["body"]["attn"]["Q"].shape == (12, 4, 42, 42)
  assert p["body"]["mlp"]["W1"].shape == (12, 168, 42) and p["V"].shape == (42, 20)
  for readout, key in (("linear", "v"), ("query", "V"), ("query_dagger", None)):
    p = jax.eval_shape(lambda k: small_tf_init(k, d=d, num_layers=1, readout=readout), jax.random.key(0))
    assert readout_kind(p) == readout
    assert (key in p) if key else set(p) == {"body"}


@pytest.fixture(scope="module")
def objective():
  return make_objective("small_tf", d=d, n=N, s=2, batch=8, num_layers=2, num_heads=2, mlp_hidden=8)


@pytest.fixture(scope="module")
def loss_and_grad(objective):
  return jax.jit(jax.value_and_grad(objective.loss))


def test_one_training_step_lowers_the_loss(objective, loss_and_grad, task):
  params = jax.jit(objective.init)(jax.random.key(0))
  batch = jax.eval_shape(objective.sample, jax.random.key(1))
  assert jax.tree_util.tree_map(jnp.shape, batch) == jax.tree_util.tree_map(jnp.shape, task)
  batch = task  # same shapes as the sampler's, one compile shared with the next test
  opt = optax.adam(1e-3)
  loss0, grads = loss_and_grad(params, batch)

  @jax.jit
  def adam_step(params, grads):
    updates, _ = opt.update(grads, opt.init(params), params)
    return optax.apply_updates(params, updates)

  loss1, _ = loss_and_grad(adam_step(params, grads), batch)
  assert np.isfinite(loss0) and loss1 < loss0


def test_loss_on_query_and_all(objective, task, batch_predict, loss_and_grad):
  params = jax.jit(objective.init)(jax.random.key(0))
  preds = np.asarray(batch_predict(params, task.X, task.y, task.x_query))
  np.testing.assert_allclose(preds[3], jax.jit(small_tf_predict)(params, task.X[3], task.y[3], task.x_query[3]),
                             rtol=1e-5)
  np.testing.assert_allclose(loss_and_grad(params, task)[0], np.mean((task.y_query - preds[:, -1]) ** 2), rtol=1e-5)
  obj_all = make_objective("small_tf", d=d, n=N, s=2, batch=16, loss_on="all", num_layers=2, num_heads=2,
                           mlp_hidden=8)
  targets = np.concatenate([task.y, task.y_query[:, None]], axis=1)
  np.testing.assert_allclose(jax.jit(obj_all.loss)(params, task), np.mean((targets - preds) ** 2), rtol=1e-5)


def test_evaluate_per_prompt_length_matches_truncated_prompts(task, tf_params, batch_predict):
  params = tf_params
  ev = evaluate("small_tf", params, task)
  assert sorted(ev["per_prompt_length"]) == list(range(1, N + 1))
  for n in (2, N):
    preds = np.asarray(batch_predict(params, task.X[:, :n], task.y[:, :n], task.x_query))[:, -1]
    np.testing.assert_allclose(ev["per_prompt_length"][n], np.mean((task.y_query - preds) ** 2), rtol=1e-4)
  assert ev["pred_error"] == ev["per_prompt_length"][N]
  np.testing.assert_allclose(ev["pred_error_median"], np.median((task.y_query - preds) ** 2), rtol=1e-4)
  np.testing.assert_allclose(ev["pred_error_ci95"], mean_interval((task.y_query - preds) ** 2), rtol=1e-4)


def test_nnx_wrapper_matches_pure_functions(tf_params, task):
  module = SmallTF.from_params(tf_params)
  np.testing.assert_allclose(module(task.X[0], task.y[0], task.x_query[0]),
                             predict("small_tf", tf_params, task.X[0], task.y[0], task.x_query[0]), rtol=1e-6)
  assert jax.tree_util.tree_structure(module.to_params()) == jax.tree_util.tree_structure(tf_params)
  capped = SmallTF.from_params(tf_params, score_clip=0.5)
  np.testing.assert_allclose(capped(task.X[0], task.y[0], task.x_query[0]),
                             small_tf_predict(tf_params, task.X[0], task.y[0], task.x_query[0], score_clip=0.5),
                             rtol=1e-6)
  p = init_params("small_tf", jax.random.key(0), d=d, n=N, num_layers=1, readout="linear")
  assert readout_kind(p) == "linear"


def test_gpt2_dispatch(task):
  # GPT-2's own training-step test lives in tests/test_gpt2.py; here: the objective wiring.
  gpt2 = pytest.importorskip("l2o_jax.transformer.gpt2")
  obj = make_objective("gpt2", d=d, n=N, s=2, batch=8, loss_on="all", num_layers=1, width=16, num_heads=2)
  params = jax.jit(obj.init)(jax.random.key(0))
  preds = jax.jit(jax.vmap(gpt2.predict, in_axes=(None, 0, 0, 0)))(params, task.X, task.y, task.x_query)
  assert preds.shape == (task.X.shape[0], N + 1)
  targets = jnp.concatenate([task.y, task.y_query[:, None]], axis=1)
  np.testing.assert_allclose(jax.jit(obj.loss)(params, task), jnp.mean((targets - preds) ** 2), rtol=1e-5)
  np.testing.assert_allclose(jax.jit(lambda p, X, y, q: predict("gpt2", p, X, y, q))(
      params, task.X[0], task.y[0], task.x_query[0]), preds[0], rtol=1e-5)


@pytest.mark.parametrize("call, match", [
    (lambda p: transformer_forward(p["body"], jnp.zeros((D + 2, 5))), "H: expected 10 rows"),
    (lambda p: transformer_forward({"attn": p["body"]["attn"]}, jnp.zeros((D, 5))), "params"),
    (lambda p: small_tf_predict(p, jnp.zeros((3, d + 1)), jnp.zeros(3), jnp.zeros(d + 1)), "d = 4"),
    (lambda p: small_tf_predict(p, jnp.zeros((3, d)), jnp.zeros(2), jnp.zeros(d)), "y: expected shape"),
    (lambda p: linear_readout(jnp.zeros(D + 1), jnp.zeros((D, 5))), "v: expected shape"),
    (lambda p: query_readout(jnp.zeros((D, d)), jnp.zeros((D, 5)), jnp.zeros((2, d))), "X_tilde"),
    (lambda p: query_readout(jnp.zeros((D, d)), jnp.zeros((D, 4)), jnp.zeros((3, d))), "odd number"),
    (lambda p: small_tf_init(jax.random.key(0), d=d, readout="softmax"), "readout"),
    (lambda p: make_objective("bert"), "model"),
    (lambda p: make_objective("small_tf", loss_on="mean"), "loss_on"),
    (lambda p: make_objective("small_tf", score_clip=0.0), r"score_clip: expected None or a number > 0, got 0.0"),
    (lambda p: small_tf_predict(p, jnp.zeros((3, d)), jnp.zeros(3), jnp.zeros(d), score_clip="10"), "score_clip"),
    (lambda p: transformer_forward(p["body"], jnp.zeros((D, 5)), score_clip=jnp.float32(1.0)), "score_clip"),
    (lambda p: make_objective("gpt2", score_clip=10.0), "only Small TF"),
    (lambda p: small_tf_from_construction({"M": jnp.zeros((1, d, d)), "theta": jnp.zeros(1)}, 1.0,
                                          readout="linear"), "readout"),
    (lambda p: small_tf_from_construction({"M": jnp.zeros((1, d, d)), "theta": jnp.zeros(1)}, float("inf")),
     "bound: expected a finite B > 0"),                                   # inf * 0 = NaN tokens
    (lambda p: small_tf_predict({"body": p["body"], "w": jnp.zeros(D)}, jnp.zeros((3, d)), jnp.zeros(3),
                                jnp.zeros(d)), r"params: unexpected keys \['w'\]"),   # not query-dagger
    (lambda p: small_tf_init(0, d=d), r"key: expected a jax.random.key, got the int 0"),
    (lambda p: small_tf_init(jax.random.key(0), d=d, qk_scale=np.ones(2)), "qk_scale"),
    (lambda p: make_objective("small_tf", num_layer=2), "model_kwargs: .*num_layer"),   # misspelt
    (lambda p: init_params("small_tf", jax.random.key(0), d=d, out_scal=0.1),
     r"model_kwargs: unknown keyword\(s\) \['out_scal'\]; small_tf.small_tf_init accepts .*'out_scale'"),
    (lambda p: init_params("gpt2", jax.random.key(0), d=d, n=N, heads=2), r"model_kwargs: .*\['heads'\].*'num_heads'"),
    (lambda p: SmallTF(d=d, num_layers=1, qk_scal=1.0), r"init_kw: unknown keyword\(s\) \['qk_scal'\]"),
    (lambda p: SmallTF(params=p, readout="linear"), r"params: the model comes from params, so \['readout'\]"),
    (lambda p: SmallTF(d=d, num_layers=1), r"rngs: expected nnx.Rngs .*got None"),   # not a silent key(0)
    (lambda p: make_objective("gpt2", width=30, num_heads=8), "width: expected a multiple of num_heads"),
    (lambda p: x_tilde(jnp.zeros((3, d)), jnp.zeros(d + 1)), r"x_query: expected shape \(4,\)"),
    (lambda p: query_dagger_readout(jnp.zeros((D, 5)), jnp.zeros((3, d - 1))), "X_tilde"),   # d - 1 columns
])
def test_bad_inputs_raise(tf_params, call, match):
  with pytest.raises(ValueError, match=match):
    call(tf_params)


@pytest.mark.parametrize("readout,causal_blocks", [("query", None), ("linear", 1),
                                                  ("query_dagger", 3), ("query", 100)])
def test_batch_major_training_path_equals_vmapped_definition(task, readout, causal_blocks):
  """The objective's token-major forward (small_tf._predict_batch, ops.dense) equals the
  per-instance Definition 3.3 pass under vmap: predictions and parameter gradients; with the
  attention's query tokens in the default blocks, 1 or 3 blocks, or one per token
  (more blocks than tokens)."""
  params = jax.jit(lambda k: small_tf_init(k, d=d, num_layers=2, num_heads=2, mlp_hidden=7,
                                          out_scale=1.0, readout=readout))(jax.random.key(4))

  def ref(p):
    return jax.vmap(stf._predict, in_axes=(None, 0, 0, 0))(p, task.X, task.y, task.x_query)

  def loss(pred_fn, p):
    return jnp.sum(jnp.sin(pred_fn(p)))   # weights every prediction differently

  fast = lambda p: stf._predict_batch(p, task.X, task.y, task.x_query, causal_blocks=causal_blocks)
  np.testing.assert_allclose(jax.jit(fast)(params), jax.jit(ref)(params), rtol=1e-5, atol=1e-5)
  g_ref = jax.jit(jax.grad(lambda p: loss(ref, p)))(params)
  g_fast = jax.jit(jax.grad(lambda p: loss(fast, p)))(params)
  for a, b in zip(jax.tree_util.tree_leaves(g_fast), jax.tree_util.tree_leaves(g_ref)):
    # float32 sums in a different order: compare on the scale of each gradient array
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-5 * float(np.max(np.abs(b))))


@pytest.mark.parametrize("readout,num_layers", [("query", 2), ("linear", 1), ("query_dagger", 2)])
def test_query_only_path_equals_full_pass(task, readout, num_layers):
  """The query loss's path (last block at the query token only) equals the full pass's last
  prediction: values and gradients, every read-out, and K = 1 (no earlier blocks, linear case)."""
  params = jax.jit(lambda k: small_tf_init(k, d=d, num_layers=num_layers, num_heads=2, mlp_hidden=7,
                                          out_scale=1.0, readout=readout))(jax.random.key(5))
  full = lambda p: stf._predict_batch(p, task.X, task.y, task.x_query)[:, -1]
  query = lambda p: stf._predict_query_batch(p, task.X, task.y, task.x_query)
  np.testing.assert_allclose(jax.jit(query)(params), jax.jit(full)(params), rtol=1e-5, atol=1e-5)
  g_full = jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(full(p)))))(params)
  g_query = jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(query(p)))))(params)
  for a, b in zip(jax.tree_util.tree_leaves(g_query), jax.tree_util.tree_leaves(g_full)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-5 * float(np.max(np.abs(b))))


def test_score_clip_caps_attention_weights(task, tf_params):
  """score_clip (ops.attention_weights: the stability study's clip variants and the launcher's
  tf.small_tf_score_clip, not the paper's model): the token-major pass equals the token loop with min(ReLU(score), clip) weights, the
  query-only path equals its full pass, and a cap above every score changes nothing."""
  body = tf_params["body"]
  H_rows = stf._embed_rows(task.X[:2], task.y[:2], task.x_query[:2])

  @jax.jit
  def run(p):
    fwd = lambda c: stf._forward_rows(p["body"], H_rows, score_clip=c)
    pred = lambda c: stf._predict_batch(p, task.X, task.y, task.x_query, score_clip=c)[:, -1]
    query = lambda c: stf._predict_query_batch(p, task.X, task.y, task.x_query, score_clip=c)
    return fwd(None), fwd(0.5), fwd(1e30), pred(0.5), query(0.5), query(None), query(1e30)

  plain, capped, loose, full_q, query_q, query_plain, query_loose = run(tf_params)
  H0 = np.swapaxes(np.asarray(H_rows), 1, 2)
  for b in range(2):
    want = _numpy_forward(body, H0[b], clip=0.5)
    np.testing.assert_allclose(np.asarray(capped[b]).T, want, rtol=1e-4, atol=1e-4)
  # The public single-instance path (small_tf_predict, predict, transformer_forward) takes the
  # same cap; evaluate() with it scores the capped model.
  one = jax.jit(lambda p: (transformer_forward(p["body"], jnp.asarray(H0[0]), score_clip=0.5),
                           jax.vmap(lambda X, y, q: predict("small_tf", p, X, y, q, score_clip=0.5))(
                               task.X, task.y, task.x_query)[:, -1]))
  fwd_one, pred_one = one(tf_params)
  np.testing.assert_allclose(fwd_one, np.asarray(capped[0]).T, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(pred_one, full_q, rtol=1e-5, atol=1e-5)
  ev = evaluate("small_tf", tf_params, task, score_clip=0.5)
  np.testing.assert_allclose(ev["pred_error"], np.mean((task.y_query - pred_one) ** 2), rtol=1e-5)
  assert np.abs(np.asarray(capped) - np.asarray(plain)).max() > 0.1   # the cap binds
  np.testing.assert_allclose(loose, plain, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(query_q, full_q, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(query_loose, query_plain, rtol=1e-6, atol=1e-6)


def test_causal_blocks_default_per_backend(monkeypatch):
  """The attention's query blocks: on the CPU about one per CPU_TOKENS_PER_BLOCK tokens and at
  least CPU_MIN_CAUSAL_BLOCKS (2 at the paper's T = 21, 4 at T = 81, 8 at T = 161), or
  CPU_CAUSAL_BLOCKS when set; one elsewhere (launch-bound GPU products); an explicit count
  always wins."""
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert [stf._causal_blocks(None, T) for T in (1, 21, 41, 81, 161)] == [2, 2, 2, 4, 8]
  monkeypatch.setattr(stf, "CPU_CAUSAL_BLOCKS", 3)
  assert stf._causal_blocks(None, 161) == 3
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert stf._causal_blocks(None, 21) == 1 and stf._causal_blocks(None, 161) == 1
  assert stf._causal_blocks(3, 21) == 3


def test_small_tf_init_scales():
  # [small_tf.small_tf_init] the documented init std of every leaf.
  from l2o_jax.transformer import small_tf_init
  d, Lyr, M, Dh = 4, 3, 2, 40
  Dm = 2 * d + 2
  p = jax.jit(lambda k: small_tf_init(k, d=d, num_layers=Lyr, num_heads=M, mlp_hidden=Dh,
                                      qk_scale=0.7, out_scale=0.3))(jax.random.key(0))
  a, m = p["body"]["attn"], p["body"]["mlp"]
  for arr, want in ((a["Q"], 0.7 / np.sqrt(Dm)), (a["K"], 0.7 / np.sqrt(Dm)),
                    (a["V"], 0.3 / np.sqrt(Dm * M * Lyr)), (m["W1"], np.sqrt(2 / Dm)),
                    (m["W2"], 0.3 / np.sqrt(Dh * Lyr)), (p["V"], 1 / np.sqrt(Dm * d))):
    np.testing.assert_allclose(np.asarray(arr).std(), want, rtol=0.2)
  np.testing.assert_array_equal(m["b"], 0.0)


def test_integer_and_list_inputs_run_in_float(tf_params):
  # Integer or list data must give the float result, not a truncated one (the 1/i mask cast to an
  # integer dtype is 0 after the first token; GPT-2's y token took X's integer dtype).
  from l2o_jax import masked_relu_attention
  from l2o_jax.transformer import gpt2
  rng = np.random.default_rng(0)
  # Integer X and x_query with fractional labels: GPT-2's y token must not take X's dtype.
  Xi, yi, qi = rng.integers(-2, 3, (N, d)), rng.integers(-2, 3, N) + 0.5, rng.integers(-2, 3, d)
  as_f32 = lambda *a: [np.asarray(v, np.float32) for v in a]
  Hi = np.asarray(embed(*as_f32(Xi, yi, qi))).astype(np.int64)
  attn = {k: v[0] for k, v in tf_params["body"]["attn"].items()}
  g2 = jax.jit(lambda k: gpt2.init(k, d=d, max_points=N + 1, num_layers=1, width=16, num_heads=2))(
      jax.random.key(0))
  Xt = np.vstack([Xi, qi[None]])
  calls = {
      "attention": (lambda H: masked_relu_attention(H, attn), (Hi,)),
      "transformer_forward": (lambda H: transformer_forward(tf_params["body"], H), (Hi,)),
      "small_tf_predict": (lambda X, y, q: small_tf_predict(tf_params, X, y, q), (Xi, yi, qi)),
      "gpt2.predict": (lambda X, y, q: gpt2.predict(g2, X, y, q), (Xi, yi, qi)),
      "query_readout": (lambda H, Xt: query_readout(jnp.ones((D, d)), H, Xt), (Hi, Xt)),
      "query_dagger_readout": (query_dagger_readout, (Hi, Xt)),
      "linear_readout": (lambda H: linear_readout(jnp.ones(D), H), (Hi,)),
  }
  for name, (fn, args) in calls.items():
    ref = np.asarray(fn(*as_f32(*args)))
    for kind, given in (("int", args), ("list", [a.tolist() for a in args])):   # "int": X, H
      got = fn(*given)
      assert got.dtype == jnp.float32, (name, kind, got.dtype)
      np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=f"{name}, {kind} input")


@pytest.mark.parametrize("same_flops", [False, True])
def test_torch_port_matches_small_tf(tf_params, task, same_flops):
  # The benchmark's PyTorch port (benchmarks/torch_peer.py), given our weights, predicts what our
  # Small TF predicts: the ratio compares two implementations of one model. Needs torch (bench).
  torch = pytest.importorskip("torch")
  from benchmarks.torch_peer import SmallTFPort
  body = tf_params["body"]
  L, M = body["attn"]["Q"].shape[:2]
  port = SmallTFPort(d, L, M, mlp_hidden=body["mlp"]["W1"].shape[1], same_flops=same_flops)
  t = lambda a: torch.tensor(np.asarray(a, np.float32))
  with torch.no_grad():
    for name in ("Q", "K", "V"):
      getattr(port, name).copy_(t(body["attn"][name]))
    for name in ("W1", "W2", "b"):
      getattr(port, name).copy_(t(body["mlp"][name]))
    port.readout.copy_(t(tf_params["V"]))
    got = port(t(task.X), t(task.y), t(task.x_query)).numpy()
  want = np.asarray(jax.jit(jax.vmap(small_tf_predict, in_axes=(None, 0, 0, 0)))(
      tf_params, task.X, task.y, task.x_query))
  np.testing.assert_allclose(got[:, -1], want[:, -1], rtol=1e-4, atol=1e-5)   # the query (the loss)
  if not same_flops:
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
