"""The explicit Transformer of Appendix C.1 that runs LISTA-VM in context (Theorem 4.1).

Block k has four heads, in this order: +1, -1, +2, -2 (eq. C.1), and an MLP that
soft-thresholds the beta slot (eq. C.2 / C.3). With M_k = gamma^(k) M^V the step matrix of
eq. 4.4, the heads are

  +1/-1:  Q = diag(0, -/+ I on the beta slot, -B on the indicator)
          K: x slot -> beta-slot rows, indicator -> indicator;  V: x slot -> +/- M_k x (beta slot)
          score(i, j) = -/+ beta_i^T x_j - B [i odd][j odd].
          On an x-only query token i, B silences every x-only key j (needs B > |beta_i^T x_j|),
          and ReLU(-a) M_k x_j - ReLU(a) M_k x_j = -a M_k x_j with a = beta_i^T x_j on the
          demonstration keys: the -(1/i) M_k X^T X beta term.
  +2/-2:  Q: +/-1 times the indicator into the y row; K: the y slot into the y row;
          V: +/- M_k x.  ReLU(y_j) M_k x_j + ReLU(-y_j)(-(-M_k x_j)) = y_j M_k x_j: the
          (1/i) M_k X^T y term.
so token i = 2n+1 gets beta <- beta - (1/(2n+1)) M_k X_{1:n}^T (X_{1:n} beta - y_{1:n}), then
the MLP applies S_theta(k) to the beta slot: exactly eq. 4.4.

Errata (both checked numerically in tests/test_construction.py):
- The proof writes V h_j = [0; M x_{floor((i+1)/2)}; 0], the *query's* x; it must be x_j,
  the key token's x (V only sees h_j). With x_j the sum is X^T(...) as eq. 4.4 states.
- eq. C.2 puts -theta in the bias of the third ReLU block and +theta in the fourth. Then
  -ReLU(x) + ReLU(-x) + ReLU(x - theta) - ReLU(-x + theta) = -theta for large |x| of either
  sign, so the MLP outputs beta - theta, not S_theta(beta). The bias must be -theta in BOTH
  blocks: -ReLU(x) + ReLU(-x) + ReLU(x - theta) - ReLU(-x - theta) = -x + S_theta(x).
  (Section 4.3's "-ReLU(-x + theta)" has the same sign slip.)

Support restriction (Corollary D.1 / Remark 3): with a prior support set S the value matrices
use P_S M_k P_S and the +-1 keys read P_S x (as in Appendix D.2's I^S), so the beta slot stays
0 off S: the Transformer runs LISTA-VM-SS.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from l2o_jax import _checks
from l2o_jax.tasks import support_mask
from l2o_jax.transformer.embedding import beta_rows, indicator_row, model_dim, y_row

NUM_HEADS = 4  # +1, -1, +2, -2


def _check_lista_vm_params(params) -> tuple[int, int]:
  if not isinstance(params, dict) or not {"M", "theta"} <= set(params):
    raise ValueError("lista_vm_params: expected a dict {'M': (K, d, d), 'theta': (K,)}, "
                     f"got {type(params).__name__} with keys {sorted(params) if isinstance(params, dict) else None}")
  K, d, d2 = _checks.check_ndim("lista_vm_params['M']", params["M"], 3, "(K, d, d)")
  if d != d2:
    raise ValueError(f"lista_vm_params['M']: expected square (K, d, d) matrices, got shape {(K, d, d2)}")
  if _checks.shape_of("lista_vm_params['theta']", params["theta"]) != (K,):
    raise ValueError(f"lista_vm_params['theta']: expected shape ({K},) to match M's {K} layers, "
                     f"got {_checks.shape_of('lista_vm_params[theta]', params['theta'])}")
  _checks.check_nonnegative("lista_vm_params['theta']", params["theta"])
  return K, d


def construct_lista_vm_transformer(lista_vm_params, bound, *, support=None) -> dict:
  """Weights of Appendix C.1-C.2 (errata fixed) for `transformer_forward`.

  Args:
    lista_vm_params: {"M": (K, d, d), "theta": (K,)}, the LISTA-VM step matrices M^(k) and
      thresholds theta^(k) of eq. 4.4 (as returned by `l2o_jax.lista.lista_vm_init`).
    bound: B > 0; must exceed |beta_{2n+1}^(k)T x_j| for every x-only token j <= 2n+1 and every
      layer k (the proof's B >= b_beta b_x + ...). It only ever enters as ReLU(a - B) with
      a < B, which is exactly 0 in floating point, so a generous value (e.g. 1e4) costs nothing.
    support: None, an int k (the first k coordinates) or an index array: the prior support set
      of Corollary D.1; the result then runs LISTA-VM-SS.
  Returns:
    {"attn": {"Q","K","V": (K, 4, D, D)}, "mlp": {"W1": (K, 4D, D), "W2": (K, D, 4D), "b": (K, 4D)}}
    with D = 2d + 2. Differentiable in M and theta (built with jnp, traceable).
  """
  K, d = _check_lista_vm_params(lista_vm_params)
  if _checks.shape_of("bound", bound) != ():
    raise ValueError(f"bound: expected a positive scalar B, got shape {_checks.shape_of('bound', bound)}")
  if _checks.is_concrete(bound) and not 0 < float(bound) < float("inf"):
    # B multiplies the indicator products; an infinite B gives inf * 0 = NaN in every token.
    raise ValueError(f"bound: expected a finite B > 0 (it silences the x-only keys), got {float(bound)}")
  M = lista_vm_params["M"]   # (theta is checked finite above); a NaN would surface only as NaN tokens
  _checks.check_finite("lista_vm_params['M']", M, "values")
  P = np.diag(support_mask(support, d)) if support is not None else np.eye(d, dtype=np.float32)
  return _construct(jnp.asarray(lista_vm_params["M"]), jnp.asarray(lista_vm_params["theta"]),
                    jnp.asarray(bound), jnp.asarray(P))


def _construct(M, theta, bound, P):
  K, d, _ = M.shape
  dtype = jnp.result_type(M, jnp.float32)
  D = model_dim(d)
  xs, ys, bs, ind = slice(0, d), y_row(d), beta_rows(d), indicator_row(d)
  I = jnp.eye(d, dtype=dtype)
  M = (P @ M @ P).astype(dtype)
  zero = jnp.zeros((K, D, D), dtype)

  def q_beta(sign):  # heads +-1: -/+ I on the beta slot, -B on the indicator
    return zero.at[:, bs, bs].set(sign * I).at[:, ind, ind].set(-bound)

  k_beta = zero.at[:, bs, xs].set(P.astype(dtype)).at[:, ind, ind].set(1.0)
  q_y = lambda sign: zero.at[:, ys, ind].set(sign)
  k_y = zero.at[:, ys, ys].set(1.0)
  v = lambda sign: zero.at[:, bs, xs].set(sign * M)

  Q = jnp.stack([q_beta(-1.0), q_beta(1.0), q_y(1.0), q_y(-1.0)], axis=1)
  Kmat = jnp.stack([k_beta, k_beta, k_y, k_y], axis=1)
  V = jnp.stack([v(1.0), v(-1.0), v(1.0), v(-1.0)], axis=1)

  # MLP (eq. C.2 with the bias erratum): hidden = [E h; -E h; E h - theta; -E h - theta] on
  # the beta rows, E the beta-slot selector; W2 = [-I, I, I, -I].
  sel = jnp.zeros((D, D), dtype).at[bs, bs].set(I)
  W1 = jnp.broadcast_to(jnp.concatenate([sel, -sel, sel, -sel], axis=0), (K, 4 * D, D))
  eye = jnp.eye(D, dtype=dtype)
  W2 = jnp.broadcast_to(jnp.concatenate([-eye, eye, eye, -eye], axis=1), (K, D, 4 * D))
  mask = jnp.zeros((D,), dtype).at[bs].set(1.0)
  zeros = jnp.zeros((K, D), dtype)
  minus_theta = -theta.astype(dtype)[:, None] * mask
  b = jnp.concatenate([zeros, zeros, minus_theta, minus_theta], axis=1)
  return {"attn": {"Q": Q, "K": Kmat, "V": V}, "mlp": {"W1": W1, "W2": W2, "b": b}}
