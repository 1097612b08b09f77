"""The default `make run` job: a small version of every figure and the classical table on CPU
in about 4 minutes on 2 cores (README, "Quick job"). Same problem (d = 20, N = 10, S = 3); far fewer steps, smaller models and
test sets, so the numbers are indicative only (see the full configs for the paper's presets)."""
from experiments.configs.base import base


def get_config():
  c = base()
  c.name = "quick"
  c.studies = "fig1a,fig1b,fig1c,fig2,fig3,layers,classical"
  c.fig1b.methods = "lista_vm,lista_vm_ss,small_tf"
  c.layers.ks = "1,2,4,8,16"       # (paper: 1..24)
  c.layers.steps = 100

  c.lista_train.steps = 400          # 20 "epochs" of 20 steps
  c.lista_train.batch = 250
  c.lista_train.matrices_per_batch = 25
  c.lista_train.steps_per_epoch = 20
  c.lista_train.steps_per_call = 20
  c.lista_train.learning_rate = 1e-3
  c.lista_train.checkpoint_every = 200

  c.tf.small_tf_layers = 4           # (paper: 12) a quarter of the compute per step
  c.tf.gpt2_layers = 2               # (paper: 12 layers of width 256)
  c.tf.gpt2_width = 64
  c.tf.gpt2_heads = 4
  c.tf_train.steps = 300             # (paper: 10^6) far too few to learn; exercises the pipeline
  c.tf_train.batch = 64
  c.tf_train.learning_rate = 1e-4    # 3e-4 diverged for the 12-layer Small TF in our CPU tests
  c.tf_train.warmup_steps = 50
  c.tf_train.eval_every = 100
  c.tf_train.steps_per_call = 100
  c.tf_train.checkpoint_every = 200

  c.eval.num_tasks = 1024
  c.eval.curve_tasks = 256
  c.eval.prompt_lengths = "2,4,6,8,10,15,20"  # N = 10: 15 and 20 are beyond the training length
  c.eval.classical_lams = "0.01,0.1,1.0"
  c.log_every_s = 15.0
  return c
