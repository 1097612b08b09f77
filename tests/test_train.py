"""train(): the one-seed wrapper of fit() equals fused chunks run by hand, and stops on NaN."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
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


def test_make_optimizer_b2_and_weight_decay():
  p = {"w": jnp.ones(3)}
  zero = {"w": jnp.zeros(3)}
  opt = T.make_optimizer(0.1, clip_norm=None, weight_decay=0.5)   # AdamW: decay even at zero gradient
  updates, _ = opt.update(zero, opt.init(p), p)
  np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * np.ones(3), rtol=1e-6)
  grads = [{"w": jnp.array([1.0, -2.0, 0.5]) * c} for c in (1.0, 4.0, 0.25)]   # varying: b2 matters
  last = {}
  for b2 in (0.95, 0.999):   # b2 reaches Adam's second moment
    want = optax.adam(0.1, b2=b2)
    got = T.make_optimizer(0.1, clip_norm=None, b2=b2)
    s_want, s_got = want.init(p), got.init(p)
    for g in grads:
      u_want, s_want = want.update(g, s_want, p)
      u_got, s_got = got.update(g, s_got, p)
    np.testing.assert_allclose(u_got["w"], u_want["w"], rtol=1e-6)
    last[b2] = np.asarray(u_got["w"])
  assert np.abs(last[0.95] - last[0.999]).max() > 1e-5   # 1.3e-4 here, far above float32 rounding
  for kw, match in (({"b2": 1.0}, "b2"), ({"weight_decay": -1.0}, "weight_decay"),
                    ({"clip_norm": -1.0}, "clip_norm"),            # would flip the update's sign
                    ({"end_lr_factor": -0.5}, "end_lr_factor"), ({"warmup_steps": -1}, "warmup_steps"),
                    ({"decay_steps": 2.5}, "decay_steps")):
    with pytest.raises(ValueError, match=match):
      T.make_optimizer(0.1, **kw)
  for lr in (0.0, float("inf"), float("nan")):
    with pytest.raises(ValueError, match="learning_rate: expected a finite number > 0"):
      T.make_optimizer(lr)


def test_train_stops_on_non_finite_loss():
  bad = OBJ._replace(loss=lambda p, b: jnp.where(p["w"][0] != 0, jnp.nan, 1.0) + jnp.sum(p["w"]))
  with pytest.raises(T.NonFiniteLossError, match="step 1"):
    T.train(bad, T.make_optimizer(1e-2), 10, steps_per_call=5)


def _spiky_objective(p_bad):
  """Loss sum(w^2), NaN on the steps whose uniform batch draw falls below p_bad."""
  return T.Objective(lambda key: {"w": jnp.ones(3)}, lambda key: jax.random.uniform(key),
                     lambda p, b: jnp.where(b < p_bad, jnp.nan, 1.0) * jnp.sum(p["w"] ** 2))


def test_skip_nonfinite_skips_exactly_the_bad_steps():
  objective, steps = _spiky_objective(0.3), 20
  result = T.fit(objective, optax.sgd(0.1), steps, steps_per_call=5, log_fn=None, skip_nonfinite=True)
  # Independently: which steps draw a bad batch (step t uses fold_in(data key, t)).
  key = T.init_state(objective, optax.sgd(0.1), 0).key
  bad = [float(jax.random.uniform(jax.random.fold_in(key, t))) < 0.3 for t in range(steps)]
  assert 0 < sum(bad) < steps and result.skipped == sum(bad)
  # SGD on sum(w^2) multiplies w by 1 - 0.1 * 2 on every applied step and leaves it on skipped ones.
  np.testing.assert_allclose(result.state.params["w"][0], 0.8 ** (steps - sum(bad)) * np.ones(3), rtol=1e-5)
  assert int(result.state.step[0]) == steps


def test_skip_nonfinite_stops_after_a_run_of_skips_whatever_the_chunks():
  with pytest.raises(T.NonFiniteLossError, match=r"3 steps in a row \(0\.\.2\) were non-finite and skipped"):
    T.fit(_spiky_objective(2.0), optax.sgd(0.1), 20, steps_per_call=5, log_fn=None, skip_nonfinite=True,
          max_skipped_in_a_row=3)
  # The longest run of bad steps decides, not where the chunk boundaries fall (a rule on whole
  # chunks stopped a run with steps_per_call=1 at its first skipped step).
  objective, steps = _spiky_objective(0.3), 20
  key = T.init_state(objective, optax.sgd(0.1), 0).key
  bad = [float(jax.random.uniform(jax.random.fold_in(key, t))) < 0.3 for t in range(steps)]
  longest = max(len(r) for r in "".join("x" if b else " " for b in bad).split(" "))
  assert longest >= 1
  for spc in (1, 4, 20):
    kw = dict(steps_per_call=spc, log_fn=None, skip_nonfinite=True)
    assert T.fit(objective, optax.sgd(0.1), steps, max_skipped_in_a_row=longest + 1, **kw).skipped == sum(bad)
    with pytest.raises(T.NonFiniteLossError, match=f"{longest} steps in a row"):
      T.fit(objective, optax.sgd(0.1), steps, max_skipped_in_a_row=longest, **kw)


def test_finite_mean_leaves_out_skipped_steps():
  out = T.finite_mean([[1.0, np.nan, 3.0], [np.inf, np.nan, -np.inf]])
  assert out[0] == 2.0 and np.isnan(out[1])
