"""The embedding of eq. 4.2 and the explicit LISTA-VM Transformer (Theorem 4.1, Corollary D.1),
checked against l2o_jax.lista and against a float64 numpy loop of eq. 4.4."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2o_jax import lista, ops, sample_tasks
from l2o_jax.transformer import (beta_slot, construct_lista_vm_transformer, embed,
                                 transformer_forward)
from l2o_jax.transformer import construction

D_, N_, K_ = 6, 7, 5


def _random_lista_vm(seed, K=K_, d=D_):
  rng = np.random.default_rng(seed)
  M = (0.6 * np.eye(d) + 0.15 * rng.standard_normal((K, d, d))).astype(np.float32)
  theta = (0.02 + 0.1 * rng.random(K)).astype(np.float32)
  return {"M": jnp.asarray(M), "theta": jnp.asarray(theta)}


def _numpy_lista_vm(M, theta, X, y, n, support=None):
  """eq. 4.4 in float64 with n demonstrations; P_S M P_S for a support prior."""
  M, theta = np.asarray(M, np.float64), np.asarray(theta, np.float64)
  X, y = np.asarray(X, np.float64)[:n], np.asarray(y, np.float64)[:n]
  d = X.shape[1]
  P = np.eye(d) if support is None else np.diag(np.isin(np.arange(d), np.arange(support)).astype(float))
  beta, out = np.zeros(d), []
  for Mk, t in zip(M, theta):
    g = beta - (P @ Mk @ P) @ X.T @ (X @ beta - y) / (2 * n + 1)
    beta = np.sign(g) * np.maximum(np.abs(g) - t, 0.0)
    out.append(beta)
  return np.stack(out)


@pytest.fixture(scope="module")
def instance():
  t = sample_tasks(jax.random.key(3), 1, d=D_, n=N_, s=2)
  return t.X[0], t.y[0], t.x_query[0]


@pytest.fixture(scope="module")
def forward_all():
  return jax.jit(lambda p, H: transformer_forward(p, H, return_all=True))


def test_embedding_layout(instance):
  X, y, q = instance
  H = np.asarray(embed(X, y, q))
  d, N = D_, N_
  assert H.shape == (2 * d + 2, 2 * N + 1)
  for i in range(N):  # 1-indexed tokens 2i+1 (x-only) and 2i+2 (x_i, y_i)
    np.testing.assert_array_equal(H[:d, 2 * i], X[i])
    np.testing.assert_array_equal(H[:d, 2 * i + 1], X[i])
    assert H[d, 2 * i] == 0 and H[d, 2 * i + 1] == y[i]
    assert H[2 * d + 1, 2 * i] == 1 and H[2 * d + 1, 2 * i + 1] == 0
  np.testing.assert_array_equal(H[:d, -1], q)
  assert H[d, -1] == 0 and H[2 * d + 1, -1] == 1
  np.testing.assert_array_equal(H[d + 1:2 * d + 1], 0.0)


def test_beta_slot_reads_odd_tokens():
  H = jnp.arange(2 * (2 * 3 + 2) * 5, dtype=jnp.float32).reshape(2, 8, 5)  # (K, D, T), d=3, N=2
  np.testing.assert_array_equal(beta_slot(H, 1), H[:, 4:7, 2])
  np.testing.assert_array_equal(beta_slot(H[0]), H[0, 4:7, 0::2].T)
  with pytest.raises(ValueError, match="n: expected an int in"):
    beta_slot(H, 3)


@pytest.mark.parametrize("seed", [0, 1])
def test_construction_equals_lista_vm_every_n_and_layer(instance, forward_all, seed):
  X, y, q = instance
  params = _random_lista_vm(seed)
  out = forward_all(construct_lista_vm_transformer(params, 1e4), embed(X, y, q))  # (K, D, T)
  assert out.shape == (K_, 2 * D_ + 2, 2 * N_ + 1)
  for n in range(1, N_ + 1):
    np.testing.assert_allclose(beta_slot(out, n), _numpy_lista_vm(params["M"], params["theta"], X, y, n),
                               rtol=1e-4, atol=1e-5)
  for n in (1, N_):  # and the library's LISTA-VM (one compile per n, so two of them)
    np.testing.assert_allclose(beta_slot(out, n), lista.lista_vm(params, X[:n], y[:n], return_all=True),
                               rtol=1e-5, atol=1e-5)
  # Token 1 has seen no demonstration: its iterate stays S_theta(0) = 0.
  np.testing.assert_array_equal(beta_slot(out, 0), 0.0)
  # The thresholds are active (the test would not see an MLP error otherwise).
  assert np.mean(np.asarray(beta_slot(out[-1])) == 0) > 0.1


def test_construction_keeps_x_y_indicator(instance, forward_all):
  X, y, q = instance
  H = embed(X, y, q)
  out = forward_all(construct_lista_vm_transformer(_random_lista_vm(0), 1e4), H)[-1]
  rows = np.r_[0:D_ + 1, 2 * D_ + 1]
  np.testing.assert_array_equal(out[rows], H[rows])


def test_support_restricted_construction_equals_lista_vm_ss(instance, forward_all):
  X, y, q = instance
  params, k = _random_lista_vm(2), 3
  out = forward_all(construct_lista_vm_transformer(params, 1e4, support=k), embed(X, y, q))
  for n in range(1, N_ + 1):
    got = beta_slot(out, n)
    if n in (2, N_):
      np.testing.assert_allclose(got, lista.lista_vm_ss(params, X[:n], y[:n], k, return_all=True),
                                 rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, _numpy_lista_vm(params["M"], params["theta"], X, y, n, support=k),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(got)[:, k:], 0.0)
  # Without the restriction the iterate leaves the support: the test can tell them apart.
  plain = forward_all(construct_lista_vm_transformer(params, 1e4), embed(X, y, q))
  assert np.abs(np.asarray(beta_slot(plain, N_))[:, k:]).max() > 1e-3


def test_too_small_bound_breaks_the_construction(instance, forward_all):
  # B must silence the x-only keys; a tiny B lets them leak into the update.
  X, y, q = instance
  params = _random_lista_vm(0)
  out = forward_all(construct_lista_vm_transformer(params, 1e-3), embed(X, y, q))
  want = lista.lista_vm(params, X, y, return_all=True)
  assert np.abs(np.asarray(beta_slot(out, N_)) - np.asarray(want)).max() > 1e-3


def test_mlp_soft_thresholds_and_paper_bias_does_not():
  d, theta = 3, 0.5
  p = construct_lista_vm_transformer({"M": jnp.zeros((1, d, d)), "theta": jnp.array([theta])}, 1.0)
  W1, W2, b = (p["mlp"][k][0] for k in ("W1", "W2", "b"))
  H = jnp.zeros((2 * d + 2, 4)).at[d + 1:2 * d + 1].set(
      jnp.array([[-2.0, -0.3, 0.2, 1.5], [0.7, -0.6, 0.0, 0.49], [3.0, -3.0, 0.51, -0.51]]))
  out = ops.relu_mlp(H, W1, W2, b)
  np.testing.assert_allclose(out[d + 1:2 * d + 1], ops.soft_threshold(H[d + 1:2 * d + 1], theta), atol=1e-6)
  np.testing.assert_array_equal(np.delete(np.asarray(out), np.s_[d + 1:2 * d + 1], 0), 0.0)
  # eq. C.2 as printed (+theta in the fourth block) gives beta - theta for large |beta|.
  D = 2 * d + 2
  b_paper = b.at[3 * D + d + 1:3 * D + 2 * d + 1].set(theta)
  out_paper = ops.relu_mlp(H, W1, W2, b_paper)
  np.testing.assert_allclose(out_paper[d + 1, 0], -2.0 - theta, atol=1e-6)


def test_construction_is_differentiable_in_M_and_theta(instance):
  X, y, q = instance
  H = embed(X, y, q)

  def f(params):
    return jnp.sum(beta_slot(transformer_forward(construct_lista_vm_transformer(params, 1e4), H), N_) ** 2)

  def g(params):
    return jnp.sum(lista.lista_vm(params, X, y) ** 2)

  params = _random_lista_vm(0)
  ga, gb = jax.jit(jax.grad(f))(params), jax.jit(jax.grad(g))(params)
  np.testing.assert_allclose(ga["M"], gb["M"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ga["theta"], gb["theta"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("call, match", [
    (lambda: embed(jnp.zeros((3, 4)), jnp.zeros((2,)), jnp.zeros(4)), "y: expected shape"),
    (lambda: embed(jnp.zeros((3, 4)), jnp.zeros((3,)), jnp.zeros(5)), "x_query: expected shape"),
    (lambda: embed(jnp.zeros((4,)), jnp.zeros((3,)), jnp.zeros(4)), "X: expected a 2-D"),
    (lambda: construct_lista_vm_transformer({"M": jnp.zeros((2, 3, 3))}, 1.0), "lista_vm_params"),
    (lambda: construct_lista_vm_transformer({"M": jnp.zeros((2, 3, 4)), "theta": jnp.zeros(2)}, 1.0), "square"),
    (lambda: construct_lista_vm_transformer({"M": jnp.zeros((2, 3, 3)), "theta": jnp.zeros(3)}, 1.0), "theta"),
    (lambda: construct_lista_vm_transformer({"M": jnp.zeros((2, 3, 3)), "theta": -jnp.ones(2)}, 1.0), ">= 0"),
    (lambda: construct_lista_vm_transformer({"M": jnp.zeros((2, 3, 3)), "theta": jnp.zeros(2)}, 0.0), "bound"),
    (lambda: construct_lista_vm_transformer({"M": jnp.zeros((2, 3, 3)), "theta": jnp.zeros(2)}, 1.0,
                                            support=5), "support"),
    (lambda: construct_lista_vm_transformer({"M": jnp.full((2, 3, 3), jnp.nan), "theta": jnp.zeros(2)}, 1.0),
     r"lista_vm_params\['M'\]: expected finite values"),
    (lambda: embed(jnp.zeros((3, 0)), jnp.zeros(3), jnp.zeros(0)), r"X: expected d >= 1 columns"),
])
def test_bad_inputs_raise(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_head_count_constant():
  p = construct_lista_vm_transformer(_random_lista_vm(0, K=2, d=3), 1.0)
  assert p["attn"]["Q"].shape == (2, construction.NUM_HEADS, 8, 8)
  assert p["mlp"]["W1"].shape == (2, 32, 8) and p["mlp"]["b"].shape == (2, 32)
