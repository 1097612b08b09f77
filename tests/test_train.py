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


def _adam_reference(lr, grads, b1=0.9, b2=0.999, eps=1e-8):
  m = v = 0.0
  out = []
  for k, g in enumerate(grads, 1):
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    out.append(-lr * (m / (1 - b1 ** k)) / (np.sqrt(v / (1 - b2 ** k)) + eps))
  return out


def test_make_optimizer_clips_then_adam():
  # [train.make_optimizer] global-norm clipping (default 1.0) before Adam: with gradients of
  # varying norm the clipped and unclipped Adam updates differ.
  p = {"w": jnp.zeros(2)}
  gs = [np.array([3.0, 4.0]) * c for c in (2.0, 0.1, 1.0)]      # norms 10, 0.5, 5
  clipped = [g / max(1.0, np.linalg.norm(g)) for g in gs]
  opt = T.make_optimizer(0.1)
  s = opt.init(p)
  for g, want in zip(gs, _adam_reference(0.1, clipped)):
    u, s = opt.update({"w": jnp.asarray(g, jnp.float32)}, s, p)
    np.testing.assert_allclose(u["w"], want, rtol=1e-4)
  assert np.abs(_adam_reference(0.1, clipped)[-1] - _adam_reference(0.1, gs)[-1]).max() > 1e-3


def test_make_optimizer_warmup_and_cosine_schedule():
  # [train.make_optimizer] with a constant gradient every Adam update is -lr_t (m_hat / sqrt(v_hat) = 1).
  p, g = {"w": jnp.zeros(1)}, {"w": jnp.ones(1)}
  def lrs(opt, steps):
    s, out = opt.init(p), []
    for _ in range(steps):
      u, s = opt.update(g, s, p)
      out.append(-float(u["w"][0]))
    return np.array(out)
  np.testing.assert_allclose(lrs(T.make_optimizer(0.5, clip_norm=None, warmup_steps=4), 6),
                             [0, 0.125, 0.25, 0.375, 0.5, 0.5], rtol=1e-5, atol=1e-7)
  peak, end = 0.5, 0.5 * 0.1
  cos = [end + (peak - end) * 0.5 * (1 + np.cos(np.pi * k / 4)) for k in range(5)]
  np.testing.assert_allclose(lrs(T.make_optimizer(peak, clip_norm=None, warmup_steps=2, decay_steps=6,
                                                  end_lr_factor=0.1), 8),
                             [0, 0.25] + cos + [end], rtol=1e-5, atol=1e-7)


def test_skip_nonfinite_with_adam_leaves_the_moments_untouched():
  # [train.make_step] a skipped step keeps the optimizer state too: Adam's moments never see a NaN.
  p_bad, steps, lr = 0.3, 20, 0.1
  objective = T.Objective(lambda key: {"w": jnp.ones(3)}, lambda key: jax.random.uniform(key),
                          lambda p, b: jnp.where(b < p_bad, jnp.nan, 1.0) * jnp.sum(p["w"] ** 2))
  result = T.fit(objective, optax.adam(lr), steps, steps_per_call=5, log_fn=None, skip_nonfinite=True)
  key = T.init_state(objective, optax.adam(lr), 0).key
  bad = [float(jax.random.uniform(jax.random.fold_in(key, t))) < p_bad for t in range(steps)]
  assert 0 < sum(bad) < steps and result.skipped == sum(bad)
  w, m, v, k = 1.0, 0.0, 0.0, 0                      # Adam on the good steps only, by hand
  for is_bad in bad:
    if is_bad:
      continue
    k, g = k + 1, 2 * w
    m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
    w -= lr * (m / (1 - 0.9 ** k)) / (np.sqrt(v / (1 - 0.999 ** k)) + 1e-8)
  np.testing.assert_allclose(result.state.params["w"][0], np.full(3, w), rtol=1e-4, atol=1e-5)


def test_skip_nonfinite_skips_a_nan_gradient_with_finite_loss():
  # [train.make_step] skip mode: a step whose loss is finite but whose gradient is NaN is skipped.
  p_bad, steps = 0.3, 20
  objective = T.Objective(
      lambda key: {"w": jnp.ones(3)}, lambda key: jax.random.uniform(key),
      # sqrt(0 + 0) on bad steps: value 0, gradient inf * 0 = NaN; sqrt(1) with zero gradient otherwise.
      lambda p, b: jnp.sum(p["w"] ** 2) + jnp.sqrt(jnp.sum((p["w"] - p["w"]) ** 2) + jnp.where(b < p_bad, 0.0, 1.0)))
  result = T.fit(objective, optax.sgd(0.1), steps, steps_per_call=5, log_fn=None, skip_nonfinite=True)
  key = T.init_state(objective, optax.sgd(0.1), 0).key
  bad = [float(jax.random.uniform(jax.random.fold_in(key, t))) < p_bad for t in range(steps)]
  assert 0 < sum(bad) < steps and result.skipped == sum(bad)
  np.testing.assert_allclose(result.state.params["w"][0], 0.8 ** (steps - sum(bad)) * np.ones(3), rtol=1e-5)


def test_train_stops_on_non_finite_gradient_with_finite_loss():
  # [train.make_step] |w| at w = 0: loss 0, gradient 0/0 = NaN.
  obj = T.Objective(init=lambda k: {"w": jnp.zeros(3)}, sample=lambda k: jnp.zeros(()),
                    loss=lambda p, b: jnp.sqrt(jnp.sum(p["w"] ** 2)) + b)
  with pytest.raises(T.NonFiniteLossError, match="step 0"):
    T.train(obj, optax.sgd(0.1), 5, steps_per_call=5, log_fn=None)


def test_skip_streak_survives_a_resume(tmp_path):
  # A stop inside a streak of skipped steps, then a resume: the run stops on the same streak as
  # an uninterrupted one (the streak's length so far is saved beside the checkpoint).
  from l2o_jax import checkpoint
  objective, steps = _spiky_objective(0.6), 40
  key = T.init_state(objective, optax.sgd(0.1), 0).key
  bad = [float(jax.random.uniform(jax.random.fold_in(key, t))) < 0.6 for t in range(steps)]
  runs = "".join("x" if b else " " for b in bad)
  longest = max(len(r) for r in runs.split(" "))
  first = runs.index("x" * longest)                    # steps first .. first + longest - 1
  assert longest >= 2
  kw = dict(steps_per_call=1, log_fn=None, skip_nonfinite=True, max_skipped_in_a_row=longest)
  match = rf"{longest} steps in a row \({first}\.\.{first + longest - 1}\)"
  with pytest.raises(T.NonFiniteLossError, match=match):
    T.fit(objective, optax.sgd(0.1), steps, **kw)
  polls = iter(range(1, steps + 1))                    # one poll per 1-step chunk: the step reached
  stopped = T.fit(objective, optax.sgd(0.1), steps, checkpointer=checkpoint.Checkpointer(tmp_path),
                  should_stop=lambda: next(polls) == first + 1, **kw)   # after the streak's first step
  assert stopped.interrupted and int(stopped.state.step[0]) == first + 1
  with pytest.raises(T.NonFiniteLossError, match=match):
    T.fit(objective, optax.sgd(0.1), steps, checkpointer=checkpoint.Checkpointer(tmp_path), **kw)


def test_second_sigterm_reaches_the_previous_handler():
  # The first SIGTERM asks for a clean stop; a second one (a scheduler's or `timeout`'s follow-up)
  # is no longer swallowed: it goes to the handler installed before.
  import os
  import signal
  seen = []
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
  try:
    with T.StopOnSignal() as stop:
      os.kill(os.getpid(), signal.SIGTERM)
      assert stop() and seen == []
      os.kill(os.getpid(), signal.SIGTERM)
      assert seen == [signal.SIGTERM]
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_first_nonfinite_names_the_seed_that_failed_first():
  finite = np.array([[True, True, True, True], [True, False, False, False]])
  loss = np.where(finite, 1.0, np.nan)
  seed, step, value = T.first_nonfinite({"finite": finite, "loss": loss}, 100)
  assert (seed, step) == (1, 101) and np.isnan(value)
  assert T.first_nonfinite({"finite": finite[:1], "loss": loss[:1]}, 100) is None
