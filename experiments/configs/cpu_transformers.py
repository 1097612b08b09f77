"""Figures 1a, 1b and 1c at CPU scale: what a 2-core machine can train in about an hour.

The paper trains the 12-layer Small TF and the 12-layer, width-256 GPT-2 for 10^6 steps of 64
(about 10 h and 150 h per model on a 2-core CPU at the measured step times, README; see the README for the GPU commands). This preset
keeps the problem (d = 20, N = 10, S = 3, batch 64, fresh tasks every step) and shrinks the
models and the step budget, so its numbers show trends, not the paper's values:
  Small TF: 4 blocks (paper 12), 8,000 steps, loss on every prefix, Adam 3e-4;
  GPT-2: 2 layers of width 64, 4 heads (paper 12 x 256, 8 heads), same training;
  LISTA-VM / LISTA-VM-SS are not retrained here: their paper-protocol numbers are in
  docs/paper_protocol/ (fig1a.py / fig1b.py); ISTA, FISTA, LASSO and the oracle are drawn.
The loss on every prefix (Garg et al.) gives N + 1 labels per prompt instead of one; with the
query-only loss the 12-layer Small TF stayed at the trivial predictor for 1,250 steps on CPU.
"""
from experiments.configs.base import base


def get_config():
  c = base()
  c.name = "cpu_transformers"
  c.studies = "fig1a,fig1b,fig1c"
  c.fig1a.methods = "small_tf,gpt2"
  c.fig1b.methods = "small_tf,gpt2"

  c.tf.small_tf_layers = 4
  c.tf.gpt2_layers = 2
  c.tf.gpt2_width = 64
  c.tf.gpt2_heads = 4
  c.tf.loss_on = "all"
  c.tf_train.steps = 8000
  c.tf_train.learning_rate = 3e-4
  c.tf_train.warmup_steps = 500
  c.tf_train.eval_every = 1000
  c.tf_train.steps_per_call = 500
  c.tf_train.checkpoint_every = 2000

  c.eval.num_tasks = 4096
  c.eval.curve_tasks = 1024
  c.log_every_s = 60.0
  return c
