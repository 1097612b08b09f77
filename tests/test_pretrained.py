"""The shipped trained run (docs/capped_small_tf_fig1a_1m/run): the paper's 12-layer Small TF
(attention weights capped at 10) after the 10^6-step Figure 1a protocol on the CPU.

Loading its final checkpoint with today's code and scoring the run's own test set must give the
test error the run reported: this catches any change to the model, its read-out, the checkpoint
format or the test-set sampler that would silently break a trained model."""
import json
import os

import jax
import numpy as np

RUN = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "capped_small_tf_fig1a_1m", "run")
JOB = "small_tf-query"


def test_shipped_small_tf_reproduces_its_reported_test_error():
  from experiments import runner, trained
  from l2o_jax import metrics
  m = trained.load(RUN, JOB)
  reported = json.load(open(os.path.join(RUN, "results.json")))["jobs"][JOB]["pred_error"]["mean"]
  task = runner.test_tasks(m.config, m.config.eval.num_tasks, salt=runner.FINAL_SALT)
  err = float(metrics.label_error(task.y_query, jax.jit(jax.vmap(m.predict))(task.X, task.y, task.x_query)))
  # Same float32 model and prompts; only kernels and reduction order may differ from the run's
  # evaluation (BUILD_NOTES: how far off on the training machine, and the wrong test set).
  np.testing.assert_allclose(err, reported, rtol=1e-4)
