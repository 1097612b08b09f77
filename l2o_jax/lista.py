"""Learned unrolled solvers (paper sections 4.2, 4.3 and 6): LISTA, LISTA-CP, ALISTA, LISTA-VM
and LISTA-VM-SS, each an `init` plus a pure `apply(params, X, y) -> beta_hat` of ONE instance.

All unroll K layers with `lax.scan` from beta^(1) = 0 and differ only in the layer update:

  lista        beta <- S_theta_k(W_k y + S_k beta)                  (Gregor & LeCun 2010)
  lista_cp     beta <- S_theta_k(beta - D_k^T (X beta - y))         (eq. 4.1, Chen et al. 2018)
  alista       beta <- S_theta_k(beta - gamma_k W^T (X beta - y))   (Liu & Chen 2019), W analytic
  lista_vm     beta <- S_theta_k(beta - M_k X^T (X beta - y) / (2n+1))          (eq. 4.4)
  lista_vm_ss  lista_vm on X with the columns outside a prior support zeroed, and the iterate
               kept at 0 outside the support (section 6, Remark 3 / Corollary D.1)

Thresholds are stored raw and used as max(theta, 0), so an optimiser step can never make a
soft-threshold negative (a negative threshold would *inflate* every coordinate and is the usual
start of the NaN blow-ups of small LISTA problems); gradients are clipped in `make_optimizer`.

Learned weights of lista / lista_cp / alista are tied to one fixed X (classical L2O); the
LISTA-VM weights M_k multiply the instance's own X^T, so they transfer across X (Remark 1).
Batch with `jax.vmap`; every instance may have its own X.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from l2o_jax import _checks, metrics
from l2o_jax import tasks as tasks_lib
from l2o_jax.ops import soft_threshold
from l2o_jax.train import Objective

METHODS = ("lista", "lista_cp", "alista", "lista_vm", "lista_vm_ss")
PROTOCOLS = ("fixed", "meta")
# Default LASSO weight of the ISTA-equivalent initialisations (the paper's ISTA uses alpha/L).
DEFAULT_LAM = 0.1
# Relative std of the noise a PRNG key adds to a deterministic initialisation.
INIT_NOISE = 0.01


def _soft(x, theta):
  # S_theta(x) with theta >= 0 enforced by clipping the learned value (see module docstring).
  return soft_threshold(x, jnp.maximum(theta, 0.0))


_HOST_INIT = ("LISTA inits are built on the host in float64 (eigenvalues of X^T X, ALISTA's W); "
              "for several seeds call it per key")


def _check_sizes(num_layers, d, n, lam, X, key=None):
  """Validates the sizes shared by every init; returns (num_layers, d, n, X's shape or None)."""
  _checks.check_host("key", key, _HOST_INIT)
  _checks.check_host("X", X, _HOST_INIT)
  _checks.check_host("lam", lam, _HOST_INIT)
  num_layers = _checks.check_positive_int("num_layers", num_layers)
  d = _checks.check_positive_int("d", d)
  n = _checks.check_positive_int("n", n)
  _checks.check_nonnegative("lam", lam)
  shape = None if X is None else _checks.check_ndim("X", X, 2, f"(n, d) = ({n}, {d})")
  _checks.check_finite("X", X, "entries (the init computes lambda_max(X^T X))")
  return num_layers, d, n, shape


def _expected_lipschitz(n: int, d: int) -> float:
  """E[lambda_max(X^T X)] ~ (sqrt(n) + sqrt(d))^2 for X with i.i.d. N(0, 1) entries."""
  return float((np.sqrt(n) + np.sqrt(d)) ** 2)


# ----------------------------------------------------------------------------------------------
# Layer updates. Each takes (params_k, X, y, beta) for one layer and one instance.


def _unroll(layer, params, X, y, d, return_all):
  """beta^(1) = 0, then K layers; returns beta^(K+1) (d,) or beta^(2..K+1) (K, d)."""

  def step(beta, p):
    beta = layer(p, X, y, beta)
    return beta, beta

  beta, traj = lax.scan(step, jnp.zeros((d,), X.dtype), params)
  return traj if return_all else beta


def _lista_layer(p, X, y, beta):
  return _soft(p["W"] @ y + p["S"] @ beta, p["theta"])


def _lista_cp_layer(p, X, y, beta):
  return _soft(beta - p["D"].T @ (X @ beta - y), p["theta"])


def _lista_vm_layer(p, X, y, beta):
  n = X.shape[0]
  return _soft(beta - (p["M"] @ (X.T @ (X @ beta - y))) / (2 * n + 1), p["theta"])


def _apply_lista(params, X, y, return_all=False):
  return _unroll(_lista_layer, params, X, y, X.shape[1], return_all)


def _apply_lista_cp(params, X, y, return_all=False):
  return _unroll(_lista_cp_layer, params, X, y, X.shape[1], return_all)


def _apply_alista(params, X, y, return_all=False):
  # W is analytic (a function of the fixed X), not learned: block its gradient so an optimiser
  # leaves it untouched (Adam's update for a zero gradient is zero).
  W = lax.stop_gradient(params["W"])
  per_layer = {"gamma": params["gamma"], "theta": params["theta"]}

  def layer(p, X, y, beta):
    return _soft(beta - p["gamma"] * (W.T @ (X @ beta - y)), p["theta"])

  return _unroll(layer, per_layer, X, y, X.shape[1], return_all)


def _apply_lista_vm(params, X, y, return_all=False):
  return _unroll(_lista_vm_layer, params, X, y, X.shape[1], return_all)


def _apply_lista_vm_ss(params, X, y, mask, return_all=False):
  # Zeroing X's columns outside the prior makes X^T r vanish there, but M_k still mixes
  # coordinates; masking every iterate (equivalently the rows of M_k and theta's output) keeps
  # beta exactly 0 outside the support, as the Transformer of Corollary D.1 does.
  Xs = X * mask

  def layer(p, X, y, beta):
    return mask * _lista_vm_layer(p, X, y, beta)

  return _unroll(layer, params, Xs, y, X.shape[1], return_all)


def _apply(method, params, X, y, mask=None, return_all=False):
  """Unchecked dispatch for use inside jitted code; mask is the (d,) support mask."""
  if method == "lista_vm_ss":
    return _apply_lista_vm_ss(params, X, y, mask, return_all)
  return {"lista": _apply_lista, "lista_cp": _apply_lista_cp, "alista": _apply_alista,
          "lista_vm": _apply_lista_vm}[method](params, X, y, return_all)


# ----------------------------------------------------------------------------------------------
# Argument checks (Python boundary, before tracing).


def _check_method(method):
  if method not in METHODS:
    raise ValueError(f"method: expected one of {METHODS}, got {method!r}")


def _param_shapes(method, K, n, d):
  return {
      "lista": {"W": (K, d, n), "S": (K, d, d), "theta": (K,)},
      "lista_cp": {"D": (K, n, d), "theta": (K,)},
      "alista": {"W": (n, d), "gamma": (K,), "theta": (K,)},
      "lista_vm": {"M": (K, d, d), "theta": (K,)},
      "lista_vm_ss": {"M": (K, d, d), "theta": (K,)},
  }[method]


def _check_params(method, params, n, d) -> int:
  """Checks keys and shapes of `params` against an instance with n rows, d columns; returns K."""
  if not isinstance(params, dict):
    raise ValueError(f"params: expected a dict of arrays for {method!r}, got {type(params).__name__}")
  expected_keys = set(_param_shapes(method, 1, n, d))
  if set(params) != expected_keys:
    raise ValueError(f"params: expected keys {sorted(expected_keys)} for {method!r}, got {sorted(params)}")
  theta = _checks.check_ndim("params['theta']", params["theta"], 1, "(K,) one threshold per layer")
  K = theta[0]
  if K < 1:
    raise ValueError("params['theta']: expected K >= 1 layers, got shape (0,)")
  for name, want in _param_shapes(method, K, n, d).items():
    got = _checks.shape_of(f"params['{name}']", params[name])
    if got != want:
      raise ValueError(f"params['{name}']: expected shape {want} for {method!r} with K={K} layers (the "
                       f"length of params['theta']) and X of shape ({n}, {d}), got {got}")
  return K


def _as_float(params, X, y):
  """X and y in one floating dtype with the params (ints become float32; under x64 a float64
  input keeps float64), so the layer loop's carry has one type."""
  dtype = _checks.float_dtype(X, y, *jax.tree_util.tree_leaves(params))
  return jnp.asarray(X, dtype), jnp.asarray(y, dtype)


# ----------------------------------------------------------------------------------------------
# Public single-instance functions.


def lista_vm_init(key_or_none, num_layers: int, d: int, *, n: int | None = None, lam: float = DEFAULT_LAM,
                  X=None, support=None):
  """LISTA-VM parameters {"M": (K, d, d), "theta": (K,)} with an ISTA-like start.

  With M_k = c I, eq. (4.4) is ISTA with step c / (2n+1). We take c = (2n+1)/L and
  theta_k = lam / L, where L = lambda_max(X^T X) if the (n, d) matrix X is given (then
  `lista_vm(params, X, y)` equals `ista(X, y, lam, K)` exactly) and otherwise the expected
  L ~ (sqrt(n) + sqrt(d))^2 of a standard Gaussian X (n defaults to X's rows, else the paper's
  N = 10; an n that contradicts X is an error). With a
  support prior (LISTA-VM-SS) X's columns outside it are zeroed first, and the expected L uses
  the prior's size instead of d. A PRNG key (instead of None) adds i.i.d. N(0, (0.01 c)^2)
  noise to every entry of M.
  """
  if key_or_none is not None:
    _checks.check_key("key_or_none", key_or_none)
  if X is not None and n is None:
    n = _checks.check_ndim("X", X, 2, f"(n, {d})")[0]
  num_layers, d, n, shape = _check_sizes(num_layers, d, 10 if n is None else n, lam, X, key_or_none)
  if X is not None:
    if shape != (n, d):
      raise ValueError(f"X: expected shape (n, d) = ({n}, {d}), got {shape}")
    L = _np_lipschitz(np.asarray(X, np.float64) * tasks_lib.support_mask(support, d))
  else:
    L = _expected_lipschitz(n, len(tasks_lib.support_indices(support, d, 1)))
  c = (2 * n + 1) / L
  M = np.broadcast_to(c * np.eye(d), (num_layers, d, d))
  if key_or_none is not None:
    M = M + INIT_NOISE * c * _np_normal(key_or_none, M.shape)
  return {"M": jnp.asarray(M, jnp.float32), "theta": jnp.full((num_layers,), lam / L, jnp.float32)}


def lista_vm(params, X, y, *, return_all: bool = False):
  """LISTA-VM, eq. (4.4): beta^(k+1) = S_theta_k(beta^(k) - (1/(2n+1)) M_k X^T (X beta^(k) - y)).

  Args:
    params: {"M": (K, d, d), "theta": (K,)}.
    X: (n, d), the instance's own measurement matrix (n = number of demonstrations).
    y: (n,).
    return_all: return every layer's iterate beta^(2), ..., beta^(K+1) as (K, d).
  Returns:
    beta^(K+1), shape (d,), or (K, d).
  """
  n, d = _checks.check_instance(X, y)
  _check_params("lista_vm", params, n, d)
  return _apply_lista_vm(params, *_as_float(params, X, y), return_all)


def lista_vm_ss(params, X, y, support, *, return_all: bool = False):
  """LISTA-VM-SS (section 6): eq. (4.4) on X with the columns outside `support` zeroed and the
  iterate kept at zero outside it, so beta_hat_i = 0 for every i not in the support.

  support: None (all coordinates; then this equals `lista_vm`), an int k (the first k
  coordinates, the paper uses k = 10) or an index array, as in `tasks.support_indices`.
  """
  n, d = _checks.check_instance(X, y)
  _check_params("lista_vm_ss", params, n, d)
  X, y = _as_float(params, X, y)
  mask = jnp.asarray(tasks_lib.support_mask(support, d), X.dtype)
  return _apply_lista_vm_ss(params, X, y, mask, return_all)


def alista_weight(X):
  """ALISTA's analytic W (n, d) for a fixed X (n, d) (Liu & Chen 2019, eq. 15-16).

  Minimises the Frobenius generalised coherence ||W^T X||_F^2 subject to diag(W^T X) = 1 (the
  relaxation Liu & Chen solve in practice). The problem separates over columns: minimise
  ||X^T w_i||^2 s.t. w_i^T x_i = 1, whose solution for X X^T invertible (n < d, Gaussian X) is
      w_i = G^{-1} x_i / (x_i^T G^{-1} x_i),   G = X X^T,
  so no projected-gradient loop is needed. Computed once on the host in float64 (X is fixed and
  concrete); a tiny ridge on G guards a rank-deficient X.
  """
  n, d = _checks.check_ndim("X", X, 2, "(n, d), the fixed measurement matrix")
  if not _checks.is_concrete(X):
    raise ValueError("X: expected a concrete (n, d) array (ALISTA's W is computed on the host), got a tracer")
  X = np.asarray(X, np.float64)
  G = X @ X.T
  G = G + 1e-10 * np.trace(G) / n * np.eye(n)
  GinvX = np.linalg.solve(G, X)
  return jnp.asarray(GinvX / np.sum(X * GinvX, axis=0), jnp.float32)


def _np_lipschitz(X) -> float:
  """lambda_max(X^T X) in float64 on the host (init only; `solvers.lipschitz` is the jax one)."""
  X = np.asarray(X, np.float64)
  gram = X @ X.T if X.shape[0] <= X.shape[1] else X.T @ X
  return max(float(np.linalg.eigvalsh(gram)[-1]), np.finfo(np.float32).tiny)


def _np_normal(key, shape) -> np.ndarray:
  return np.asarray(jax.random.normal(key, shape, jnp.float32), np.float64)


def init(method: str, key, *, num_layers: int = 12, d: int = 20, n: int = 10, X=None, support=None,
         lam: float = DEFAULT_LAM) -> dict[str, Any]:
  """Initial parameters for `method` (one of METHODS), K = num_layers layers.

  ISTA-equivalent starts (with L = lambda_max(X^T X), step 1/L, threshold lam/L):
    lista:    W_k = X^T / L, S_k = I - X^T X / L, theta_k = lam / L.
    lista_cp: D_k = X / L, theta_k = lam / L.
    lista_vm / lista_vm_ss: M_k = (2n+1)/L I, theta_k = lam / L (see `lista_vm_init`); for
      lista_vm_ss X's columns outside `support` are zeroed before computing L.
    alista (X required): W = `alista_weight(X)`, gamma_k = 1 / ||W^T X||_2, theta_k = lam gamma_k.
      There is no ISTA-equivalent start: W is not X / L.
  With X = None (meta-training): lista / lista_cp start from the ISTA weights of a reference
  matrix X0 ~ N(0, 1)^(n x d) drawn from `key` (key None -> jax.random.key(0)). Its weights do
  not match any test X -- that is the point of Figure 2 -- but they give non-degenerate gradients
  (D = 0 or W = 0 would make every iterate 0, where the soft-threshold has zero gradient).
  lista_vm / lista_vm_ss use the expected Lipschitz constant of a Gaussian X.
  A key (rather than None) perturbs the matrices by 1% relative Gaussian noise.
  """
  _check_method(method)
  if key is not None:
    _checks.check_key("key", key)
  num_layers, d, n, shape = _check_sizes(num_layers, d, n, lam, X, key)
  if X is not None:
    if shape != (n, d):
      raise ValueError(f"X: expected shape (n, d) = ({n}, {d}), got {shape}")
    X = np.asarray(X, np.float64)
  if method in ("lista_vm", "lista_vm_ss"):
    return lista_vm_init(key, num_layers, d, n=n, lam=lam, X=X,
                         support=support if method == "lista_vm_ss" else None)
  if method == "alista":
    if X is None:
      raise ValueError("X: method 'alista' needs the fixed (n, d) measurement matrix X (W is computed "
                       "from it), got None")
    W = alista_weight(X)
    gamma = 1.0 / float(np.linalg.norm(np.asarray(W, np.float64).T @ X, 2))
    return {"W": W, "gamma": jnp.full((num_layers,), gamma, jnp.float32),
            "theta": jnp.full((num_layers,), lam * gamma, jnp.float32)}
  if X is None:
    X = _np_normal(jax.random.key(0) if key is None else key, (n, d))
  L = _np_lipschitz(X)
  K = num_layers
  if method == "lista":
    params = {"W": np.broadcast_to(X.T / L, (K, d, n)),
              "S": np.broadcast_to(np.eye(d) - X.T @ X / L, (K, d, d))}
  else:
    params = {"D": np.broadcast_to(X / L, (K, n, d))}
  if key is not None:
    noise = _np_normal(jax.random.fold_in(key, 1), (sum(v.size for v in params.values()),))
    offsets = np.cumsum([0] + [v.size for v in params.values()])
    params = {k: v + INIT_NOISE * v.std() * noise[a:b].reshape(v.shape)
              for (k, v), a, b in zip(params.items(), offsets[:-1], offsets[1:])}
  params = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
  params["theta"] = jnp.full((K,), lam / L, jnp.float32)
  return params


def apply(method: str, params, X, y, *, support=None, return_all: bool = False):
  """beta_hat of `method` for one instance X (n, d), y (n,): (d,), or (K, d) with return_all.

  `support` is used only by lista_vm_ss (None | int k | index array).
  """
  _check_method(method)
  if method == "lista_vm_ss":
    return lista_vm_ss(params, X, y, support, return_all=return_all)
  if support is not None:
    raise ValueError(f"support: only 'lista_vm_ss' takes a support prior, got support={support!r} "
                     f"for {method!r}")
  n, d = _checks.check_instance(X, y)
  _check_params(method, params, n, d)
  return _apply(method, params, *_as_float(params, X, y), None, return_all)


# ----------------------------------------------------------------------------------------------
# Training objectives.


def _sample_meta(key, *, batch, matrices, d, n, s, support, noise_std=0.0):
  """`matrices` fresh X's, each shared by batch // matrices fresh sparse vectors (Appendix F)."""
  k_task, k_x = jax.random.split(key)
  task = tasks_lib.sample_tasks(k_task, batch, d=d, n=n, s=s, support=support, noise_std=noise_std)
  X = jax.random.normal(k_x, (matrices, n, d), jnp.float32)
  X = jnp.repeat(X, batch // matrices, axis=0)
  y = jnp.einsum("bnd,bd->bn", X, task.beta)
  if noise_std:
    # The labels are remeasured with the shared X's, so they need their own noise; drawn from a
    # folded key only when asked for, so noiseless runs keep their exact data stream.
    y = y + noise_std * jax.random.normal(jax.random.fold_in(key, 1), y.shape, y.dtype)
  return task._replace(X=X, y=y)


def make_objective(method: str, *, protocol: str, d: int = 20, n: int = 10, s: int = 3, support=None,
                   num_layers: int = 12, batch: int = 500, matrices_per_batch: int | None = None,
                   X_fixed=None, lam: float = DEFAULT_LAM, noise_std: float = 0.0) -> Objective:
  """A `train.Objective` for `method` under the classical ("fixed") or meta-training protocol.

  protocol "fixed": every batch is `batch` fresh S-sparse vectors measured by X_fixed (n, d)
    (section 6, "Baselines"); init is ISTA-equivalent on X_fixed (plus 1% noise from the key).
  protocol "meta": every batch holds `matrices_per_batch` fresh Gaussian X's, each measuring
    batch // matrices_per_batch fresh vectors (default: one X per instance). The paper's epoch
    is 100 matrices x 500 vectors = 50,000 instances (Appendix F). Not available for alista,
    whose W is the solution of an optimisation problem for one fixed X (as in the paper).
  `support` restricts the sparse vectors' support (and, for lista_vm_ss, the model) to a prior.
  `noise_std`: Gaussian noise on the training labels y (`sample_tasks`; the paper's is 0). The
  target stays the noiseless beta*.
  Loss: the paper's sum_j ||beta_hat_j - beta_j||^2 divided by the batch size (a mean, so the
  learning rate does not depend on the batch).
  """
  _check_method(method)
  if protocol not in PROTOCOLS:
    raise ValueError(f"protocol: expected one of {PROTOCOLS}, got {protocol!r}")
  d = _checks.check_positive_int("d", d)
  n = _checks.check_positive_int("n", n)
  s = _checks.check_positive_int("s", s)
  batch = _checks.check_positive_int("batch", batch)
  num_layers = _checks.check_positive_int("num_layers", num_layers)
  tasks_lib.support_indices(support, d, s)  # validates support and s
  _checks.check_nonnegative("lam", lam)      # here, not first at init inside train.fit
  mask = jnp.asarray(tasks_lib.support_mask(support, d))
  if _checks.shape_of("noise_std", noise_std) != ():
    raise ValueError(f"noise_std: expected a scalar, got shape {_checks.shape_of('noise_std', noise_std)}")
  _checks.check_nonnegative("noise_std", noise_std)
  noise_std = float(noise_std)
  if protocol == "fixed":
    if X_fixed is None:
      raise ValueError("X_fixed: protocol 'fixed' needs the fixed (n, d) measurement matrix, got None")
    shape = _checks.check_ndim("X_fixed", X_fixed, 2, f"(n, d) = ({n}, {d})")
    if shape != (n, d):
      raise ValueError(f"X_fixed: expected shape (n, d) = ({n}, {d}), got {shape}")
    _checks.check_finite("X_fixed", X_fixed)
    if matrices_per_batch is not None:
      raise ValueError(f"matrices_per_batch: only used by protocol 'meta', got {matrices_per_batch}")
    X_fixed = jnp.asarray(X_fixed, jnp.float32)
    sample = functools.partial(tasks_lib.sample_tasks, batch=batch, d=d, n=n, s=s, support=support,
                               X=X_fixed, noise_std=noise_std)
  else:
    if method == "alista":
      raise ValueError("method: 'alista' cannot be meta-trained (its W solves a non-convex problem per "
                       "fixed X, section 6); use protocol 'fixed'")
    if X_fixed is not None:
      raise ValueError("X_fixed: protocol 'meta' samples a fresh X per group of instances; got a fixed X")
    matrices = batch if matrices_per_batch is None else _checks.check_positive_int(
        "matrices_per_batch", matrices_per_batch)
    if batch % matrices:
      raise ValueError(f"matrices_per_batch: expected a divisor of batch={batch}, got {matrices}")
    sample = functools.partial(_sample_meta, batch=batch, matrices=matrices, d=d, n=n, s=s,
                               support=support, noise_std=noise_std)

  def init_fn(key):
    return init(method, key, num_layers=num_layers, d=d, n=n, X=X_fixed, support=support, lam=lam)

  def loss(params, task):
    beta_hat = jax.vmap(lambda X, y: _apply(method, params, X, y, mask))(task.X, task.y)
    return jnp.sum((beta_hat - task.beta) ** 2) / task.beta.shape[0]

  return Objective(init_fn, sample, loss)


# ----------------------------------------------------------------------------------------------
# Evaluation.


def per_layer_prediction_error(betas, task) -> np.ndarray:
  """(K,) mean over tasks of (y_query - x_query^T beta^(k+1))^2, for betas (B, K, d)."""
  B, K, d = _checks.check_ndim("betas", betas, 3, "(B, K, d) per-layer iterates")
  tasks_lib.check_task(task)
  if _checks.shape_of("task.x_query", task.x_query) != (B, d):
    raise ValueError(f"task.x_query: expected shape ({B}, {d}) to match betas {(B, K, d)}, "
                     f"got {_checks.shape_of('task.x_query', task.x_query)}")
  pred = jnp.einsum("bd,bkd->bk", task.x_query, betas)
  return np.asarray(jnp.mean((task.y_query[:, None] - pred) ** 2, axis=0))


@functools.partial(jax.jit, static_argnames=("method",))
def _evaluate(method, params, X, y, mask):
  return jax.vmap(lambda X, y: _apply(method, params, X, y, mask, True))(X, y)


def evaluate(method: str, params, task, *, support=None) -> dict[str, Any]:
  """Prediction error (section 6) of `method` on a batch of tasks.

  Returns {"pred_error": mean (y_query - x_query^T beta_hat)^2 after the last layer,
  "pred_error_median": the median over tasks of the same, "pred_error_ci95": (lo, hi) the
  bootstrap 95% interval of the mean over tasks (`metrics.mean_interval`: these errors are
  heavy-tailed), "per_layer": [K floats] the mean after each layer, "beta_nmse_db": 10 log10 of
  sum ||beta_hat - beta||^2 / sum ||beta||^2}.
  """
  _check_method(method)
  B, n, d = tasks_lib.check_task(task)
  if method != "lista_vm_ss" and support is not None:
    raise ValueError(f"support: only 'lista_vm_ss' takes a support prior, got support={support!r}")
  _check_params(method, params, n, d)
  mask = jnp.asarray(tasks_lib.support_mask(support, d))
  betas = _evaluate(method, params, *_as_float(params, task.X, task.y), mask)
  per_layer = per_layer_prediction_error(betas, task)
  final = betas[:, -1]
  errors = metrics.prediction_errors(task.y_query, task.x_query, final)
  return {"pred_error": float(per_layer[-1]), "pred_error_median": float(metrics.median_error(errors)),
          "pred_error_ci95": metrics.mean_interval(errors),
          "per_layer": [float(v) for v in per_layer],
          "beta_nmse_db": float(metrics.beta_nmse_db(final, task.beta))}
