"""Tests for l2o_jax.lista: ISTA equivalence of the initialisations, eq. (4.4) against a numpy
loop, the support constraint of LISTA-VM-SS, ALISTA's constraint, one training step, errors."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from l2o_jax import lista, metrics, solvers, tasks, train

D, N, K, LAM = 8, 5, 4, 0.1


@pytest.fixture(scope="module")
def task():
  # Built in numpy (sample_tasks is tested elsewhere; this saves a compile).
  rng = np.random.default_rng(0)
  X = rng.normal(size=(6, N, D)).astype(np.float32)
  beta = np.zeros((6, D), np.float32)
  for b in range(6):
    beta[b, rng.choice(D, 2, replace=False)] = rng.normal(size=2)
  x_query = rng.normal(size=(6, D)).astype(np.float32)
  return tasks.Task(jnp.asarray(X), jnp.asarray(np.einsum("bnd,bd->bn", X, beta)), jnp.asarray(x_query),
                    jnp.asarray(np.einsum("bd,bd->b", x_query, beta)), jnp.asarray(beta))


def _np_soft(x, theta):
  return np.sign(x) * np.maximum(np.abs(x) - max(theta, 0.0), 0.0)


def _np_lista_vm(M, theta, X, y, mask=None):
  """Eq. (4.4) written out as a plain loop; mask (LISTA-VM-SS) zeroes X's columns and beta."""
  X = np.asarray(X, np.float64)
  n, d = X.shape
  mask = np.ones(d) if mask is None else np.asarray(mask, np.float64)
  X = X * mask
  beta, out = np.zeros(d), []
  for k in range(len(theta)):
    beta = mask * _np_soft(beta - M[k] @ X.T @ (X @ beta - y) / (2 * n + 1), theta[k])
    out.append(beta)
  return np.stack(out)


@pytest.mark.parametrize("method", ["lista", "lista_cp", "lista_vm", "lista_vm_ss"])
def test_ista_equivalent_init_equals_ista(task, method):
  X, y = task.X[0], task.y[0]
  params = lista.init(method, None, num_layers=K, d=D, n=N, X=X, lam=LAM)
  got = lista.apply(method, params, X, y, return_all=True)
  want = solvers.ista(X, y, LAM, K, return_trajectory=True)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert np.abs(np.asarray(want[-1])).sum() > 0  # a non-trivial trajectory


def test_lista_vm_ss_ista_init_equals_ista_on_masked_X(task):
  X, y = task.X[1], task.y[1]
  params = lista.init("lista_vm_ss", None, num_layers=K, d=D, n=N, X=X, support=5, lam=LAM)
  got = lista.apply("lista_vm_ss", params, X, y, support=5, return_all=True)
  want = solvers.ista(X * (jnp.arange(D) < 5), y, LAM, K, return_trajectory=True)
  np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("n", [1, 3, 7])
def test_lista_vm_matches_numpy_loop_with_2n_plus_1_scaling(n):
  rng = np.random.default_rng(n)
  X = rng.normal(size=(n, D)).astype(np.float32)
  y = rng.normal(size=n).astype(np.float32)
  M = rng.normal(size=(K, D, D)).astype(np.float32)
  theta = np.array([0.05, -0.1, 0.02, 0.0], np.float32)  # a negative one is used as 0
  got = lista.lista_vm({"M": M, "theta": theta}, X, y, return_all=True)
  np.testing.assert_allclose(got, _np_lista_vm(M, theta, X, y), rtol=1e-4, atol=1e-5)
  # The scaling is 1/(2n+1), not 1/n or 1/(2n): those give different iterates.
  wrong = _np_lista_vm(M * (2 * n + 1) / (2 * n), theta, X, y)
  assert np.abs(np.asarray(got) - wrong).max() > 1e-3


def test_lista_vm_vmaps_over_different_X(task):
  params = lista.lista_vm_init(jax.random.key(3), K, D, n=N)
  got = jax.vmap(lambda X, y: lista.lista_vm(params, X, y))(task.X, task.y)
  for b in range(task.X.shape[0]):
    want = _np_lista_vm(np.asarray(params["M"]), np.asarray(params["theta"]), task.X[b], task.y[b])
    np.testing.assert_allclose(got[b], want[-1], rtol=1e-4, atol=1e-5)


def test_lista_vm_init_deterministic_and_noisy():
  a = lista.lista_vm_init(None, K, D, n=N)
  b = lista.lista_vm_init(jax.random.key(0), K, D, n=N)
  assert a["M"].shape == (K, D, D) and a["theta"].shape == (K,)
  c = (2 * N + 1) / (np.sqrt(N) + np.sqrt(D)) ** 2
  np.testing.assert_allclose(a["M"][2], c * np.eye(D), rtol=1e-6)
  diff = np.asarray(b["M"] - a["M"])
  assert 0 < np.abs(diff).max() < 0.1 * c


@pytest.mark.parametrize("support", [3, np.array([6, 1, 4])])
def test_lista_vm_ss_no_mass_outside_support(task, support):
  rng = np.random.default_rng(1)
  M = rng.normal(size=(K, D, D)).astype(np.float32)
  theta = np.full((K,), 0.01, np.float32)
  params = {"M": M, "theta": theta}
  got = jax.vmap(lambda X, y: lista.lista_vm_ss(params, X, y, support, return_all=True))(task.X, task.y)
  mask = tasks.support_mask(support, D)
  assert np.all(np.asarray(got)[..., mask == 0] == 0.0)
  assert np.abs(np.asarray(got)[..., mask == 1]).max() > 0
  want = _np_lista_vm(M, theta, task.X[2], task.y[2], mask)
  np.testing.assert_allclose(got[2], want, rtol=1e-4, atol=1e-5)


def test_lista_vm_ss_without_support_is_lista_vm(task):
  params = lista.lista_vm_init(jax.random.key(1), K, D, n=N)
  np.testing.assert_allclose(lista.lista_vm_ss(params, task.X[0], task.y[0], None),
                             lista.lista_vm(params, task.X[0], task.y[0]), atol=1e-6)


def test_alista_weight_constraint_and_optimality():
  X = np.random.default_rng(2).normal(size=(N, D))
  W = np.asarray(lista.alista_weight(X), np.float64)
  np.testing.assert_allclose(np.diag(W.T @ X), 1.0, atol=1e-4)
  # Each column minimises ||X^T w||^2 on the affine set w^T x_i = 1: any feasible move
  # w + t v (v orthogonal to x_i) does not decrease it.
  rng = np.random.default_rng(3)
  for i in range(D):
    f0 = np.sum((X.T @ W[:, i]) ** 2)
    for _ in range(5):
      v = rng.normal(size=N)
      v -= (v @ X[:, i]) / (X[:, i] @ X[:, i]) * X[:, i]
      assert np.sum((X.T @ (W[:, i] + 0.05 * v)) ** 2) >= f0 - 1e-6
  # ... and beats the ISTA choice X / L rescaled to meet the constraint.
  W_ista = X / np.sum(X * X, axis=0)
  assert np.sum((W.T @ X) ** 2) < np.sum((W_ista.T @ X) ** 2)


def test_alista_apply_matches_formula(task):
  X, y = task.X[0], task.y[0]
  params = lista.init("alista", None, num_layers=K, d=D, n=N, X=X)
  W, g, th = (np.asarray(params[k], np.float64) for k in ("W", "gamma", "theta"))
  beta = np.zeros(D)
  for k in range(K):
    beta = _np_soft(beta - g[k] * W.T @ (np.asarray(X) @ beta - np.asarray(y)), th[k])
  np.testing.assert_allclose(lista.apply("alista", params, X, y), beta, rtol=1e-4, atol=1e-5)


def _objective(method, protocol, batch=64, noise_std=0.0):
  X_fixed = np.random.default_rng(4).normal(size=(N, D)).astype(np.float32) if protocol == "fixed" else None
  kw = {"X_fixed": X_fixed} if protocol == "fixed" else {"matrices_per_batch": 8}
  support = 6 if method == "lista_vm_ss" else None
  return lista.make_objective(method, protocol=protocol, d=D, n=N, s=2, num_layers=K, batch=batch,
                              support=support, noise_std=noise_std, **kw)


@pytest.mark.parametrize("method,protocol", [("lista", "fixed"), ("lista_cp", "meta"), ("alista", "fixed"),
                                             ("lista_vm", "meta"), ("lista_vm_ss", "meta")])
def test_one_adam_step_decreases_loss(method, protocol):
  obj = _objective(method, protocol)
  params = obj.init(jax.random.key(0))
  batch = obj.sample(jax.random.key(1))
  opt = train.make_optimizer(1e-3)
  loss_and_grad = jax.jit(jax.value_and_grad(obj.loss))
  before, grads = loss_and_grad(params, batch)
  updates, _ = opt.update(grads, opt.init(params), params)
  new = optax.apply_updates(params, updates)
  after, _ = loss_and_grad(new, batch)
  assert np.isfinite(before) and float(after) < float(before)
  if method == "alista":  # W is analytic: no gradient, so Adam leaves it in place
    np.testing.assert_array_equal(grads["W"], 0.0)
    np.testing.assert_array_equal(new["W"], params["W"])


def test_train_chunk_step_decreases_loss_on_its_batch():
  obj = _objective("lista_vm", "meta")
  opt = train.make_optimizer(1e-3)
  state = train.init_state(obj, opt, seed=0)
  batch = obj.sample(jax.random.fold_in(state.key, 0))  # the data of step 0
  before = float(obj.loss(state.params, batch))
  state, m = train.make_train_chunk(obj, opt, 1)(state)
  np.testing.assert_allclose(m["loss"][0], before, rtol=1e-5)
  assert float(obj.loss(state.params, batch)) < before


def test_meta_sampler_shares_matrices_in_groups():
  b = _objective("lista_vm", "meta").sample(jax.random.key(5))  # 8 matrices x 8 vectors
  X = np.asarray(b.X)
  assert X.shape == (64, N, D)
  np.testing.assert_array_equal(X[0], X[7])
  assert not np.allclose(X[7], X[8])
  np.testing.assert_allclose(b.y, np.einsum("bnd,bd->bn", X, b.beta), rtol=1e-5, atol=1e-5)
  assert np.all((np.asarray(b.beta) != 0).sum(1) == 2)


@pytest.mark.parametrize("protocol", ["fixed", "meta"])
def test_training_labels_carry_noise_std(protocol):
  key = jax.random.key(5)
  clean = _objective("lista_cp", protocol, batch=640).sample(key)
  noisy = _objective("lista_cp", protocol, batch=640, noise_std=0.5).sample(key)
  np.testing.assert_array_equal(noisy.X, clean.X)     # same matrices and vectors; only y moves
  np.testing.assert_array_equal(noisy.beta, clean.beta)
  residual = np.asarray(noisy.y - np.einsum("bnd,bd->bn", noisy.X, noisy.beta))
  assert abs(residual.std() - 0.5) < 0.05, residual.std()   # 3,200 draws of N(0, 0.25)
  np.testing.assert_allclose(clean.y, np.einsum("bnd,bd->bn", clean.X, clean.beta), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="noise_std"):
    _objective("lista_cp", protocol, noise_std=-1.0)


def test_evaluate_matches_metrics(task):
  params = lista.lista_vm_init(jax.random.key(2), K, D, n=N)
  ev = lista.evaluate("lista_vm", params, task)
  betas = jax.vmap(lambda X, y: lista.lista_vm(params, X, y, return_all=True))(task.X, task.y)
  assert len(ev["per_layer"]) == K
  for k in range(K):
    want = metrics.prediction_error(task.y_query, task.x_query, betas[:, k])
    np.testing.assert_allclose(ev["per_layer"][k], want, rtol=1e-5)
  np.testing.assert_allclose(ev["pred_error"], ev["per_layer"][-1])
  final = np.asarray(betas[:, -1])
  errors = (task.y_query - np.einsum("bd,bd->b", task.x_query, final)) ** 2
  np.testing.assert_allclose(ev["pred_error_median"], np.median(errors), rtol=1e-5)
  np.testing.assert_allclose(ev["pred_error_ci95"], metrics.mean_interval(errors), rtol=1e-5)
  np.testing.assert_allclose(ev["beta_nmse_db"], metrics.beta_nmse_db(betas[:, -1], task.beta), rtol=1e-5)


def test_bad_inputs_raise(task):
  X, y = task.X[0], task.y[0]
  p = lista.lista_vm_init(None, K, D, n=N)
  with pytest.raises(ValueError, match="method"):
    lista.apply("lista_xx", p, X, y)
  with pytest.raises(ValueError, match=r"params\['M'\].*\(4, 8, 8\)"):
    lista.lista_vm({"M": p["M"][:, :3], "theta": p["theta"]}, X, y)
  with pytest.raises(ValueError, match="params: expected keys"):
    lista.apply("lista_cp", p, X, y)
  with pytest.raises(ValueError, match="X: expected a 2-D"):
    lista.lista_vm(p, task.X, task.y)
  with pytest.raises(ValueError, match="y: expected shape"):
    lista.lista_vm(p, X, y[:3])
  with pytest.raises(ValueError, match="support"):
    lista.apply("lista_vm", p, X, y, support=3)
  with pytest.raises(ValueError, match="support"):
    lista.lista_vm_ss(p, X, y, D + 1)
  with pytest.raises(ValueError, match="X: method 'alista'"):
    lista.init("alista", None, d=D, n=N)
  with pytest.raises(ValueError, match="X: expected shape"):
    lista.init("lista", None, d=D, n=N, X=np.zeros((N + 1, D)))
  with pytest.raises(ValueError, match="method: 'alista' cannot be meta-trained"):
    lista.make_objective("alista", protocol="meta", d=D, n=N)
  with pytest.raises(ValueError, match="X_fixed"):
    lista.make_objective("lista", protocol="fixed", d=D, n=N)
  with pytest.raises(ValueError, match="matrices_per_batch"):
    lista.make_objective("lista_vm", protocol="meta", d=D, n=N, batch=10, matrices_per_batch=3)
  with pytest.raises(ValueError, match="protocol"):
    lista.make_objective("lista_vm", protocol="online", d=D, n=N)
  with pytest.raises(ValueError, match="num_layers"):
    lista.lista_vm_init(None, 0, D)
  with pytest.raises(ValueError, match="betas"):
    lista.per_layer_prediction_error(np.zeros((6, D)), task)
  with pytest.raises(ValueError, match=r"params\['M'\]: expected shape .*the length of params\['theta'\]"):
    lista.lista_vm({"M": p["M"], "theta": p["theta"][:2]}, X, y)
  with pytest.raises(ValueError, match=r"X: expected shape \(n, d\) = \(3, 8\)"):
    lista.lista_vm_init(None, K, D, n=3, X=np.ones((N, D)))           # n contradicts X
  with pytest.raises(ValueError, match="X: expected finite entries"):
    lista.lista_vm_init(None, K, D, X=np.full((N, D), np.nan))
  with pytest.raises(ValueError, match="key: expected a jax.random.key, got the int 1"):
    lista.init("lista", 1, num_layers=K, d=D, n=N)
  with pytest.raises(ValueError, match="key_or_none: expected a jax.random.key"):
    lista.lista_vm_init(1, K, D)
  with pytest.raises(ValueError, match="task: expected an l2o_jax.Task"):
    lista.evaluate("lista_vm", p, tuple(task))
  # Host-side inits under a transform, and make_objective's lam / X_fixed, fail at once with a reason.
  with pytest.raises(ValueError, match="key: got a traced value; LISTA inits are built on the host"):
    jax.jit(lambda k: lista.lista_vm_init(k, K, D))(jax.random.key(0))
  with pytest.raises(ValueError, match="key: got a traced value"):
    jax.vmap(lambda k: lista.init("lista", k, num_layers=K, d=D, n=N))(jax.random.split(jax.random.key(0), 2))
  with pytest.raises(ValueError, match="lam: expected"):
    lista.make_objective("lista", protocol="fixed", d=D, n=N, X_fixed=np.ones((N, D)), lam=-1.0)
  with pytest.raises(ValueError, match="X_fixed: expected finite entries"):
    lista.make_objective("lista", protocol="fixed", d=D, n=N, X_fixed=np.full((N, D), np.nan))


def test_integer_and_float64_inputs():
  # Integer data runs in float32 (the params' type); float64 numpy input with x64 off is taken
  # as float32 without a warning; with x64 on, float64 data lifts the loop to float64.
  p = lista.lista_vm_init(None, K, D)
  assert lista.lista_vm_init(None, K, D, X=np.ones((3, D)))["M"].shape == (K, D, D)   # n from X
  rng = np.random.default_rng(0)
  Xi, yi = rng.integers(-2, 3, (N, D)), rng.integers(-2, 3, N)
  got = lista.lista_vm(p, Xi, yi)
  np.testing.assert_allclose(got, lista.lista_vm(p, Xi.astype(np.float32), yi.astype(np.float32)), rtol=1e-6)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert lista.apply("lista_vm", p, Xi.astype(np.float64), yi.astype(np.float64)).dtype == jnp.float32
  with jax.enable_x64():
    assert lista.lista_vm(p, Xi.astype(np.float64), yi.astype(np.float32)).dtype == jnp.float64


def test_alista_init_step_and_threshold():
  # [lista.init "alista"] gamma_k = 1 / ||W^T X||_2 and theta_k = lam gamma_k.
  X = np.random.default_rng(2).normal(size=(N, D))
  p = lista.init("alista", None, num_layers=K, d=D, n=N, X=X, lam=LAM)
  gamma = 1.0 / np.linalg.norm(np.asarray(p["W"], np.float64).T @ X, 2)
  np.testing.assert_allclose(p["gamma"], np.full(K, gamma), rtol=1e-5)
  np.testing.assert_allclose(p["theta"], np.full(K, LAM * gamma), rtol=1e-5)


def test_objective_loss_is_mean_over_instances_of_squared_norms():
  # [lista.make_objective] loss = sum_j ||beta_hat_j - beta_j||^2 / B (section 6, over the batch).
  rng = np.random.default_rng(0)
  X = rng.normal(size=(6, N, D)).astype(np.float32)
  beta = rng.normal(size=(6, D)).astype(np.float32)
  task = tasks.Task(jnp.asarray(X), jnp.asarray(np.einsum("bnd,bd->bn", X, beta)), jnp.zeros((6, D)),
                    jnp.zeros(6), jnp.asarray(beta))
  obj = lista.make_objective("lista_vm", protocol="meta", d=D, n=N, s=2, num_layers=K, batch=6)
  params = lista.lista_vm_init(jax.random.key(0), K, D, n=N)
  bh = np.stack([np.asarray(lista.lista_vm(params, X[b], task.y[b])) for b in range(6)])
  np.testing.assert_allclose(obj.loss(params, task), np.sum((bh - beta) ** 2) / 6, rtol=1e-5)
