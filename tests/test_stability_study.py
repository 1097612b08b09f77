"""experiments.small_tf_stability: its window statistics, and a tiny run end to end."""
import json
import os
import subprocess
import sys

import numpy as np

from experiments import small_tf_stability as study

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_window_stats_counts_nonfinite_and_large_losses():
  losses = np.array([1.0, 3.0, np.nan, 2.0, 500.0, np.inf, 4.0, 7.0])
  w = study.window_stats(losses, 4)
  assert w == [{"step": 4, "median": 2.0, "max_finite": 3.0, "nonfinite": 1, "over_100": 0},
               {"step": 8, "median": 7.0, "max_finite": 500.0, "nonfinite": 1, "over_100": 1}]
  assert [x["skipped"] for x in study.window_stats(losses, 4, skipped=[1, 2])] == [1, 2]


def test_exploding_norm_percentiles_ranks_the_bad_prompts_by_norm():
  norms = np.array([4.0, 2.0, 3.0, 1.0])
  errors = np.array([5.0, np.nan, 2e3, 1.0])     # prompts 1 (non-finite) and 2 (> 1e3) explode
  assert study.exploding_norm_percentiles(norms, errors) == [0.25, 0.5]
  assert study.exploding_norm_percentiles(norms, errors, above=1e4) == [0.25]
  assert study.exploding_norm_percentiles(norms, np.ones(4)) == []


def test_tiny_study_runs_and_rejects_unknown_variants(child_env):
  base = [sys.executable, "-m", "experiments.small_tf_stability", "--num_layers=1", "--d=4",
          "--batch=8", "--test_tasks=64"]
  proc = subprocess.run(base + ["--variants=wd0.1,drop1e3,clip100", "--seeds=2", "--steps=20", "--window=10"],
                        cwd=REPO, env=child_env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  assert [(r["variant"], r["seed"], r["drop_above"], r["score_clip"]) for r in rows] == [
      ("wd0.1", 0, None, None), ("wd0.1", 1, None, None), ("drop1e3", 0, 1e3, None),
      ("drop1e3", 1, 1e3, None), ("clip100", 0, None, 100.0), ("clip100", 1, None, 100.0)]
  assert rows[0]["test_mean"] != rows[1]["test_mean"]     # the seeds are different runs
  for r in rows:
    assert [(w["step"], w["skipped"]) for w in r["windows"]] == [(10, 0), (20, 0)] and r["skipped"] == 0
    assert np.isfinite(r["test_mean"]) and r["test_nonfinite"] == 0 and r["test_median"] > 0
    assert r["bad_norm_percentiles"] == []
  bad = subprocess.run(base + ["--variants=lr1e-4,adam"], cwd=REPO, env=child_env, capture_output=True,
                       text=True, timeout=120)
  assert bad.returncode != 0 and "variants: unknown ['adam']" in bad.stderr


def test_drop_exploding_prompts_trains_on_the_other_prompts_only():
  import jax
  import jax.numpy as jnp

  from l2o_jax.transformer import make_objective

  base = make_objective("small_tf", d=4, batch=4, num_layers=2)
  params = base.init(jax.random.key(0))
  task = base.sample(jax.random.key(1))
  # prompt 0 blown up: ReLU attention is cubic in the tokens, so its loss is astronomically large
  big = task._replace(X=task.X.at[0].mul(1e4), y=task.y.at[0].mul(1e4), x_query=task.x_query.at[0].mul(1e4))
  rest = jax.tree_util.tree_map(lambda a: a[1:], task)
  dropped = study.drop_exploding_prompts(base, 1e3)

  @jax.jit
  def all_values(params):
    vg = lambda loss, t: jax.value_and_grad(loss)(params, t)
    return vg(dropped.loss, big), vg(base.loss, rest), vg(dropped.loss, task), vg(base.loss, task), \
        base.loss(params, big)

  (l_drop, g_drop), (l_rest, g_rest), (l_same, g_same), (l_task, g_task), l_big = all_values(params)
  assert not l_big < 1e3                       # the plain loss is dominated by prompt 0
  np.testing.assert_allclose(l_drop, l_rest, rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(g_drop), jax.tree_util.tree_leaves(g_rest)):
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # nothing to drop: the plain loss and gradient
  np.testing.assert_allclose(l_same, l_task, rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(g_same), jax.tree_util.tree_leaves(g_task)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_capped_objective_is_the_query_loss_of_the_capped_model():
  # make_objective(score_clip=c) (the study's clip variants and the launcher's
  # tf.small_tf_score_clip) trains the capped model that query_errors and the drop loss evaluate.
  import jax
  import jax.numpy as jnp

  from l2o_jax.transformer import make_objective
  from l2o_jax.transformer import small_tf as stf

  objective = lambda c: make_objective("small_tf", d=4, batch=4, num_layers=2, score_clip=c)
  base = objective(None)
  params = base.init(jax.random.key(0))
  task = base.sample(jax.random.key(1))
  task = task._replace(X=task.X * 3, y=task.y * 3, x_query=task.x_query * 3)   # scores well above 1

  @jax.jit
  def losses(params):
    capped = lambda c: jnp.mean((task.y_query - stf._predict_query_batch(
        params, task.X, task.y, task.x_query, score_clip=c)) ** 2)
    return (objective(1.0).loss(params, task), capped(1.0), jnp.mean(study.query_errors(params, task, 1.0)),
            objective(1e30).loss(params, task), base.loss(params, task),
            study.drop_exploding_prompts(objective(1.0), 1e30, score_clip=1.0).loss(params, task))

  clipped, want, errors, loose, plain, dropped = losses(params)
  np.testing.assert_allclose(clipped, want, rtol=1e-6)
  np.testing.assert_allclose(errors, want, rtol=1e-6)
  np.testing.assert_allclose(loose, plain, rtol=1e-6)
  np.testing.assert_allclose(dropped, clipped, rtol=1e-5)    # nothing dropped: the capped loss
  assert abs(clipped - plain) > 1e-3 * abs(plain)              # the cap binds


def test_initial_score_percentiles_match_a_loop_over_definition_3_1():
  import jax

  from l2o_jax.transformer import make_objective
  from l2o_jax.transformer import small_tf as stf

  objective = make_objective("small_tf", d=3, batch=2, num_layers=2, num_heads=2)
  params, task = objective.init(jax.random.key(0)), objective.sample(jax.random.key(1))
  H = np.asarray(stf._embed_rows(task.X, task.y, task.x_query))       # (B, T, D)
  Q, K = (np.asarray(params["body"]["attn"][k][0], np.float64) for k in "QK")
  weights = [max(0.0, float((Q[m] @ h[i]) @ (K[m] @ h[j])))
             for h in H for i in range(len(h)) for j in range(i + 1) for m in range(len(Q))]
  got = study.initial_score_percentiles(params, task, (10, 50, 90, 100))
  np.testing.assert_allclose(got, np.percentile(weights, (10, 50, 90, 100)), rtol=1e-4, atol=1e-6)
