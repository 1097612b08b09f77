"""GPT-2 baseline (l2o_jax/transformer/gpt2.py): shapes, causality, batch/instance agreement,
one Adam step, bad inputs, and two independent references -- a per-token NumPy loop and (when
torch/transformers are installed) HF `GPT2Model` given the same weights."""
import math
import types
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from l2o_jax.transformer import gpt2

D, N, B = 5, 6, 4            # x dimension, demonstrations, batch
MAX_POINTS = N + 2           # one spare point so shorter and longer prompts both fit
CFG = dict(num_layers=2, width=16, num_heads=2)


@pytest.fixture(scope="module")
def params():
  p = gpt2.init(jax.random.key(0), d=D, max_points=MAX_POINTS, **CFG)
  # Non-trivial LayerNorm/bias values and sharp attention, so the references test every
  # parameter (with the N(0, 0.02) init, attention is near-uniform and hides head mix-ups).
  rng = np.random.default_rng(1)
  return jax.tree_util.tree_map(lambda x: jnp.asarray(x + 0.1 * rng.standard_normal(x.shape), jnp.float32), p)


class _Task(NamedTuple):
  X: jax.Array
  y: jax.Array
  x_query: jax.Array
  y_query: jax.Array


@pytest.fixture(scope="module")
def task():
  # NumPy data (a sample_tasks compile would cost seconds): sparse beta*, y = X beta*.
  rng = np.random.default_rng(2)
  beta = np.where(rng.random((B, D)) < 0.4, rng.standard_normal((B, D)), 0.0)
  X, xq = rng.standard_normal((B, N, D)), rng.standard_normal((B, D))
  return _Task(*(jnp.asarray(a, jnp.float32) for a in (X, np.einsum("bnd,bd->bn", X, beta), xq,
                                                      np.einsum("bd,bd->b", xq, beta))))


@pytest.fixture(scope="module")
def predict_jit():
  return jax.jit(gpt2.predict_batch, static_argnames=("attention",))


def _numpy_reference(p, X, y, xq):
  """Token-by-token GPT-2 forward (float64): attention of token t over tokens 0..t only."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), p)
  n, d = X.shape
  toks = []
  for i in range(n):
    toks += [X[i], np.eye(d)[0] * y[i]]
  toks.append(xq)
  h = np.stack(toks) @ p["read_in"]["w"] + p["read_in"]["b"] + p["wpe"][:len(toks)]

  def ln(v, g, b):
    return (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + 1e-5) * g + b

  def gelu_new(v):
    return 0.5 * v * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))

  T, W = h.shape
  num_heads = p["blocks"]["qkv_w"].shape[3]
  hd = W // num_heads
  for layer in range(p["blocks"]["qkv_w"].shape[0]):
    q = {k: v[layer] for k, v in p["blocks"].items()}
    a = ln(h, q["ln1_g"], q["ln1_b"]) @ q["qkv_w"].reshape(W, 3 * W) + q["qkv_b"].reshape(3 * W)
    Q, K, V = a[:, :W], a[:, W:2 * W], a[:, 2 * W:]
    att = np.zeros((T, W))
    for t in range(T):
      for m in range(num_heads):
        sl = slice(m * hd, (m + 1) * hd)
        s = K[:t + 1, sl] @ Q[t, sl] / math.sqrt(hd)
        w = np.exp(s - s.max())
        att[t, sl] = (w / w.sum()) @ V[:t + 1, sl]
    h = h + att @ q["proj_w"] + q["proj_b"]
    h = h + gelu_new(ln(h, q["ln2_g"], q["ln2_b"]) @ q["fc_w"] + q["fc_b"]) @ q["out_w"] + q["out_b"]
  h = ln(h, p["ln_f"]["g"], p["ln_f"]["b"])
  return (h @ p["read_out"]["w"] + p["read_out"]["b"])[::2]


def test_shapes_and_prompt_lengths(params, task, predict_jit):
  out = predict_jit(params, task.X, task.y, task.x_query)
  assert out.shape == (B, N + 1)
  # eval_shape: shapes without compiling. Any n with n + 1 <= max_points, including the longest.
  single = jax.eval_shape(gpt2.predict, params, task.X[0], task.y[0], task.x_query[0])
  assert single.shape == (N + 1,)
  X, y = jnp.concatenate([task.X, task.X[:, :1]], 1), jnp.concatenate([task.y, task.y[:, :1]], 1)
  assert jax.eval_shape(gpt2.predict_batch, params, X, y, task.x_query).shape == (B, N + 2)
  short = jax.eval_shape(gpt2.predict_batch, params, task.X[:, :1], task.y[:, :1], task.x_query)
  assert short.shape == (B, 2)
  cfg = gpt2.config(params)
  assert cfg == dict(d=D, max_points=MAX_POINTS, **CFG)


def test_matches_numpy_reference(params, task, predict_jit):
  out = np.asarray(predict_jit(params, task.X, task.y, task.x_query))
  for b in range(2):
    ref = _numpy_reference(params, *(np.asarray(a[b], np.float64) for a in (task.X, task.y, task.x_query)))
    np.testing.assert_allclose(out[b], ref, rtol=1e-5, atol=1e-5)   # float32 vs float64: ~2e-7
  xla = predict_jit(params, task.X, task.y, task.x_query, attention="xla")
  np.testing.assert_allclose(np.asarray(xla), out, rtol=1e-5, atol=1e-5)


def test_predict_equals_predict_batch(params, task, predict_jit):
  batch = np.asarray(predict_jit(params, task.X, task.y, task.x_query))
  single = jax.jit(jax.vmap(gpt2.predict, in_axes=(None, 0, 0, 0)))(params, task.X, task.y, task.x_query)
  np.testing.assert_allclose(np.asarray(single), batch, rtol=1e-5, atol=1e-6)
  one = jax.jit(gpt2.predict)(params, task.X[1], task.y[1], task.x_query[1])
  np.testing.assert_allclose(np.asarray(one), batch[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 4])
def test_causality(params, task, predict_jit, k):
  # Perturb y_k (0-based index k) and every x after it: predictions 0..k are read at x_1..x_{k+1},
  # which come before y_{k+1}'s token, so they must not move; later ones must.
  X = task.X.at[:, k + 1:].add(1.0)
  y = task.y.at[:, k:].add(1.0)
  xq = task.x_query + 1.0
  base = np.asarray(predict_jit(params, task.X, task.y, task.x_query))
  pert = np.asarray(predict_jit(params, X, y, xq))
  np.testing.assert_array_equal(pert[:, :k + 1], base[:, :k + 1])
  assert np.all(np.abs(pert[:, k + 1:] - base[:, k + 1:]) > 1e-6)


def test_one_adam_step_lowers_loss(params, task, predict_jit):
  opt = optax.adam(1e-3)

  @jax.jit
  def step(p):
    loss_fn = lambda p: gpt2.loss(p, task.X, task.y, task.x_query, task.y_query)
    l0, g = jax.value_and_grad(loss_fn)(p)
    updates, _ = opt.update(g, opt.init(p), p)
    query_loss = gpt2.loss(p, task.X, task.y, task.x_query, task.y_query, prefix=False)
    return l0, loss_fn(optax.apply_updates(p, updates)), query_loss

  l0, l1, query_loss = step(params)
  assert np.isfinite(float(l0)) and float(l1) < float(l0)
  # The query-only loss is the last column of the prefix loss.
  pred = predict_jit(params, task.X, task.y, task.x_query)
  np.testing.assert_allclose(float(query_loss), float(jnp.mean((pred[:, -1] - task.y_query) ** 2)),
                             rtol=1e-5)


def test_learns_in_context_copy_task():
  """Training, not one step: on prompts whose labels all equal one per-prompt constant c ~ N(0, 1),
  a 1-layer GPT-2 must learn to read c off the earlier y tokens. With no demonstration (the first
  prediction) nothing reveals c, so its error must stay near E[c^2] = 1: a model that saw its own
  label (a read-out at the wrong token, a leaky mask) would drive that to 0 too."""
  d, n, batch, steps = 2, 6, 64, 300
  params = gpt2.init(jax.random.key(3), d=d, max_points=n + 1, num_layers=1, width=32, num_heads=2)
  opt = optax.adam(3e-3)

  def sample(key):
    kx, kc = jax.random.split(key)
    X = jax.random.normal(kx, (batch, n + 1, d))
    y = jnp.broadcast_to(jax.random.normal(kc, (batch, 1)), (batch, n + 1))
    return X[:, :n], y[:, :n], X[:, n], y[:, n]

  @jax.jit
  def train_and_score(p, key):
    def step(carry, k):
      p, s = carry
      g = jax.grad(lambda p: gpt2.loss(p, *sample(k)))(p)
      u, s = opt.update(g, s, p)
      return (optax.apply_updates(p, u), s), None
    k_train, k_test = jax.random.split(key)
    (p, _), _ = jax.lax.scan(step, (p, opt.init(p)), jax.random.split(k_train, steps))
    errs = []
    for k in jax.random.split(k_test, 8):   # 512 test prompts
      X, y, xq, yq = sample(k)
      errs.append((gpt2.predict_batch(p, X, y, xq) - jnp.concatenate([y, yq[:, None]], 1)) ** 2)
    return jnp.concatenate(errs).mean(0)

  err = np.asarray(train_and_score(params, jax.random.key(4)))   # (n + 1,): by demonstrations seen
  assert 0.6 < err[0] < 1.6, err
  assert np.all(err[2:] < 0.1), err


def test_bad_inputs(params, task):
  X, y, xq = task.X, task.y, task.x_query
  with pytest.raises(ValueError, match="X: expected a 3-D"):
    gpt2.predict_batch(params, X[0], y, xq)
  with pytest.raises(ValueError, match="y: expected shape"):
    gpt2.predict_batch(params, X, y[:, :-1], xq)
  with pytest.raises(ValueError, match="x_query: expected shape"):
    gpt2.predict_batch(params, X, y, xq[:, :-1])
  with pytest.raises(ValueError, match="d = 5"):
    gpt2.predict_batch(params, X[..., :-1], y, xq[:, :-1])
  too_long = jnp.zeros((B, MAX_POINTS, D))
  with pytest.raises(ValueError, match="max_points"):
    gpt2.predict_batch(params, too_long, jnp.zeros((B, MAX_POINTS)), xq)
  with pytest.raises(ValueError, match="x_query: expected shape"):
    gpt2.predict(params, X[0], y[0], xq[0, :-1])
  with pytest.raises(ValueError, match=rf"got n = {MAX_POINTS} demonstrations \(shape \({MAX_POINTS}, {D}\)\)"):
    gpt2.predict(params, too_long[0], jnp.zeros(MAX_POINTS), xq[0])   # one instance: its own shape
  with pytest.raises(ValueError, match="attention"):
    gpt2.predict_batch(params, X, y, xq, attention="flash")
  with pytest.raises(ValueError, match="width"):
    gpt2.init(jax.random.key(0), d=D, max_points=4, width=10, num_heads=4)
  with pytest.raises(ValueError, match="max_points"):
    gpt2.init(jax.random.key(0), d=D, max_points=0)
  with pytest.raises(ValueError, match="params"):
    gpt2.predict_batch({"w": 1}, X, y, xq)


def test_matches_hf_gpt2(params, task, predict_jit):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  W, L, M = CFG["width"], CFG["num_layers"], CFG["num_heads"]
  config = transformers.GPT2Config(n_positions=2 * MAX_POINTS, n_embd=W, n_layer=L, n_head=M,
                                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                                   activation_function="gelu_new", layer_norm_epsilon=1e-5)
  config._attn_implementation = "eager"
  model = transformers.GPT2Model(config).eval()
  t = lambda a: torch.tensor(np.asarray(a, np.float32))
  blk = params["blocks"]
  with torch.no_grad():
    model.wpe.weight.copy_(t(params["wpe"]))
    for i, h in enumerate(model.h):   # HF Conv1D stores weights as (in, out), like ours
      h.ln_1.weight.copy_(t(blk["ln1_g"][i])); h.ln_1.bias.copy_(t(blk["ln1_b"][i]))
      h.attn.c_attn.weight.copy_(t(blk["qkv_w"][i].reshape(W, 3 * W)))
      h.attn.c_attn.bias.copy_(t(blk["qkv_b"][i].reshape(3 * W)))
      h.attn.c_proj.weight.copy_(t(blk["proj_w"][i])); h.attn.c_proj.bias.copy_(t(blk["proj_b"][i]))
      h.ln_2.weight.copy_(t(blk["ln2_g"][i])); h.ln_2.bias.copy_(t(blk["ln2_b"][i]))
      h.mlp.c_fc.weight.copy_(t(blk["fc_w"][i])); h.mlp.c_fc.bias.copy_(t(blk["fc_b"][i]))
      h.mlp.c_proj.weight.copy_(t(blk["out_w"][i])); h.mlp.c_proj.bias.copy_(t(blk["out_b"][i]))
    model.ln_f.weight.copy_(t(params["ln_f"]["g"])); model.ln_f.bias.copy_(t(params["ln_f"]["b"]))
    embeds = t(gpt2.tokens(task.X, task.y, task.x_query)) @ t(params["read_in"]["w"]) + t(params["read_in"]["b"])
    hidden = model(inputs_embeds=embeds).last_hidden_state
    ref = (hidden @ t(params["read_out"]["w"]) + t(params["read_out"]["b"]))[:, ::2].numpy()
  out = np.asarray(predict_jit(params, task.X, task.y, task.x_query))
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_benchmark_harness_smoke(capsys):
  # The benchmark CLI and report (benchmarks/run.py) without running a benchmark or torch.
  from benchmarks import run
  args = run.parse_args(["--quick", "--only=gpt2,lasso", "--batches=64,128"])
  assert args.only == ["gpt2", "lasso"] and args.batches == [64, 128] and args.steps == 5
  with pytest.raises(SystemExit):
    run.parse_args(["--only=gpt3"])
  env = {"date_utc": "today", "command": "python -m benchmarks.run --quick", "cpu": "cpu", "machine": "x86_64",
         "cpu_count": 2, "jax_device": "cpu", "load_avg_start": 0.5, "jax": "0.x"}
  rows = [{"bench": "gpt2", "impl": "l2o_jax", "batch": 64, "n": 10, "d": 20, "step_ms": 500.0, "traces": 1},
          {"bench": "gpt2", "impl": "ratio (peer / l2o_jax step time)", "batch": 64, "ratio": 1.25},
          {"bench": "lasso", "impl": "ratio (l2o_jax / sklearn tasks/s)", "ratio": 123.0, "max_abs_beta_diff": 1e-4}]
  md = run.to_markdown(env, rows)
  assert "| gpt2 | l2o_jax | 64 | 10 | 20 | 500 |" in md
  assert "| 1.25 |" in md and "| 123 |" in md and "python -m benchmarks.run --quick" in md
  # Paired ratios: repeat i of each side ran back to back, so peer_i / ours_i is what one moment's
  # load gives; a slow spell that hits only the peer moves the ratio of medians but not its floor.
  runner = types.SimpleNamespace(compile_s=1.0, loss=0.5, traces=1)
  ours = run._train_row("small_tf", "l2o_jax", runner, [0.030, 0.040, 0.032], 64, n=10, d=20)
  peer = run._train_row("small_tf", "peer", runner, [0.090, 0.080, 0.160], 64, n=10, d=20)
  ratio = run._ratio_row("small_tf", 64, ours, peer, "peer")
  assert ours["step_ms_each"] == [30.0, 40.0, 32.0] and ours["step_ms_min"] == pytest.approx(30.0)
  assert ratio["ratio"] == pytest.approx(90 / 32) and ratio["ratio_min"] == pytest.approx(80 / 30)
  assert ratio["ratio_paired_median"] == pytest.approx(3.0)
  assert ratio["ratio_paired_range"] == pytest.approx([2.0, 5.0])
  md = run.to_markdown(env, [ours, peer, ratio])
  assert "| small_tf | l2o_jax | 64 | 10 | 20 | 32 | 30 |" in md and "| 2.81 | 2.67 | 3 (2-5) |" in md
  run._log([{"bench": "small_tf", "lr": 1e-5, "step_ms": 60.28951234}])   # the progress lines
  assert capsys.readouterr().out.strip() == '{"bench": "small_tf", "lr": 1e-05, "step_ms": 60.2895}'
  nan_runner = types.SimpleNamespace(compile_s=1.0, loss=float("nan"), traces=1)
  diverged = run._train_row("small_tf", "l2o_jax", nan_runner, [0.03], 64)
  assert diverged["diverged"] and "non-finite loss" in run.to_markdown(env, [diverged])


def test_benchmark_train_without_torch(monkeypatch):
  # `--no-peer` times our train step alone and must not need torch (the optional bench extra):
  # with the peer module made unimportable, one tiny Small TF row still comes back.
  import sys

  import benchmarks
  from benchmarks import run
  monkeypatch.setitem(sys.modules, "benchmarks.torch_peer", None)   # importing it raises ImportError
  monkeypatch.delattr(benchmarks, "torch_peer", raising=False)
  args = run.parse_args(["--steps=1", "--repeats=1", "--batches=2", "--no-peer"])
  rows = run.bench_train("small_tf", args, {"train_devices": jax.devices()[:1], "torch_device": "cpu"}, d=4, n=3)
  assert [r["impl"] for r in rows] == ["l2o_jax"]
  assert rows[0]["traces"] == 1 and rows[0]["step_ms"] > 0 and rows[0]["batch"] == 2


def test_gpt2_loss_prefix_and_query():
  # [gpt2.loss] (used by benchmarks.micro): Garg et al.'s prefix loss over y_1..y_{n+1}, or the query's.
  from l2o_jax.transformer import gpt2
  rng = np.random.default_rng(2)
  p = gpt2.init(jax.random.key(0), d=5, max_points=7, num_layers=1, width=16, num_heads=2)
  X, y, xq, yq = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((3, 6, 5), (3, 6), (3, 5), (3,)))
  pred = np.asarray(gpt2.predict_batch(p, X, y, xq))
  targets = np.concatenate([np.asarray(y), np.asarray(yq)[:, None]], axis=1)
  np.testing.assert_allclose(gpt2.loss(p, X, y, xq, yq), np.mean((pred - targets) ** 2), rtol=1e-5)
  np.testing.assert_allclose(gpt2.loss(p, X, y, xq, yq, prefix=False), np.mean((pred[:, -1] - yq) ** 2), rtol=1e-5)
