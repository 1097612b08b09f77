"""train(): the one-seed wrapper of fit() equals fused chunks run by hand, and stops on NaN."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import l2o_jax as L
from l2o_jax import train as T

OBJ = T.Objective(init=lambda k: {"w": jnp.zeros(8)},
                  sample=lambda k: L.sample_tasks(k, 16, d=8, n=4, s=2),
                  loss=lambda p, b: jnp.mean((b.y_query - b.x_query @ p["w"]) ** 2))


def test_train_equals_hand_run_chunks():
  opt = T.make_optimizer(1e-2)
  state, losses = T.train(OBJ, opt, 20, seed=3, steps_per_call=10)
  ref = T.init_state(OBJ, opt, 3)
  chunk = T.make_train_chunk(OBJ, opt, 10)
  ref_losses = []
  for _ in range(2):
    ref, m = chunk(ref)
    ref_losses.append(np.asarray(m["loss"]))
  assert losses.shape == (20,) and int(state.step) == 20
  np.testing.assert_allclose(losses, np.concatenate(ref_losses), rtol=1e-6)
  np.testing.assert_allclose(state.params["w"], ref.params["w"], rtol=1e-6, atol=1e-7)


def test_train_stops_on_non_finite_loss():
  bad = OBJ._replace(loss=lambda p, b: jnp.where(p["w"][0] != 0, jnp.nan, 1.0) + jnp.sum(p["w"]))
  with pytest.raises(T.NonFiniteLossError, match="step 1"):
    T.train(bad, T.make_optimizer(1e-2), 10, steps_per_call=5)
