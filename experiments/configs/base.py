"""Shared defaults of every experiment config: the paper's full presets (section 6, Appendix F).

Each config file (fig1a.py, ..., quick.py) calls `base()` and changes what differs. Every field
can be overridden on the command line, e.g. `--config.lista_train.steps=1000`.
Method names: lista, lista_cp, alista (trained on one fixed X), lista_meta, lista_cp_meta
(meta-trained on varying X), lista_vm, lista_vm_ss (meta-trained), small_tf, gpt2.
"""
import ml_collections


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "base"                 # run label used in logs and the report
  c.studies = "fig1a"             # comma-separated: fig1a, fig1b, fig1c, fig2, fig3, layers, classical
  c.seed = 0                      # base seed: seeds seed, seed+1, ... are trained
  c.seeds = 1                     # number of seeds trained together in one program (vmap); results give mean and std
  c.multihost = False             # call jax.distributed.initialize() first (one process per host)
  c.coordinator_address = ""      # multihost where JAX cannot detect the cluster (not TPU, SLURM, Open MPI):
  c.num_processes = 0             # "host:port" of process 0, the process count, and this process's id
  c.process_id = -1               # (0 .. num_processes - 1); ""/0/-1: detected by JAX
  c.cpu_devices = 0               # on a CPU host: JAX devices to split it into for data-parallel training
                                  # (0 = one per core, reduced to divide both train batches with >= 16 each; 1 = off)
  c.matmul_precision = "float32"  # "float32": full float32 matmuls (PyTorch's default, the paper's code line);
                                  # "default": JAX's backend default (TF32 on recent NVIDIA GPUs, bfloat16
                                  # passes on TPU: faster, less exact). CPU matmuls are float32 either way.

  c.problem = ml_collections.ConfigDict()
  c.problem.d = 20                # dimension of beta*
  c.problem.n = 10                # demonstrations N per prompt
  c.problem.s = 3                 # sparsity S of beta*
  c.problem.noise_std = 0.0       # label noise (paper: noiseless)

  c.fig1a = ml_collections.ConfigDict()
  c.fig1a.methods = "lista,lista_cp,alista,lista_meta,lista_cp_meta,lista_vm,small_tf,gpt2"  # Figure 1a bars
  c.fig1b = ml_collections.ConfigDict()
  c.fig1b.methods = "lista,lista_cp,alista,lista_vm,lista_vm_ss,small_tf,gpt2"  # Figure 1b bars
  c.fig1b.support = 10            # prior support: beta* lives on the first `support` coordinates
  c.fig1c = ml_collections.ConfigDict()
  c.fig1c.readouts = "linear,query,query_dagger"  # Small TF read-outs compared in Figure 1c
  c.fig2 = ml_collections.ConfigDict()
  c.fig2.methods = "lista_meta,lista_cp_meta"  # Figure 2: meta-trained classical LISTA, error vs epoch
  c.fig3 = ml_collections.ConfigDict()
  c.fig3.methods = "lista_vm"     # Figure 3: meta-trained LISTA-VM, error vs epoch
  c.layers = ml_collections.ConfigDict()
  c.layers.ks = ",".join(str(k) for k in range(1, 25))  # depths K of the Theorem 5.1 study
  c.layers.steps = 34000          # LISTA-VM training steps per K (0: the untrained ISTA-equivalent start)
  c.layers.bound = 1e4            # B of the construction (silences x-only keys; any large value)

  c.lista = ml_collections.ConfigDict()
  c.lista.num_layers = 12         # K unrolled layers (paper: 12)
  c.lista.lam = 0.1               # threshold lam of the ISTA-equivalent initialisation

  c.lista_train = ml_collections.ConfigDict()
  c.lista_train.steps = 34000     # 340 epochs x 100 steps of 500: 340 epochs of 50,000 instances (paper)
  c.lista_train.batch = 500       # instances per step
  c.lista_train.matrices_per_batch = 100  # meta protocol: 100 X's x 5 vectors per step, i.e. 10,000 X's per
                                          # epoch (the paper: 100 X's x 500 per epoch; 1-2 X's per step gave
                                          # spiky, heavy-tailed LISTA-VM runs, BUILD_NOTES)
  c.lista_train.steps_per_epoch = 100   # 100 x 500 = 50,000 instances per epoch; test error logged every epoch
  c.lista_train.learning_rate = 1e-3    # Adam peak learning rate (LISTA, LISTA-CP)
  c.lista_train.method_learning_rates = "alista=1e-2,lista_vm=1e-2,lista_vm_ss=1e-2"  # per-method overrides
  c.lista_train.cosine_decay = True     # cosine decay of the learning rate over the run
  c.lista_train.end_lr_factor = 0.1     # final learning rate / peak
  c.lista_train.clip_norm = 1.0   # global-norm gradient clipping (0: off)
  c.lista_train.method_clip_norms = ""   # per-method overrides, e.g. "lista_vm_ss=10": a looser clip
                                        # trades LISTA-VM(-SS)'s typical error for no diverging tasks (BUILD_NOTES)
  c.lista_train.steps_per_call = 100    # steps fused in one jit call (steps_per_epoch must be a multiple)
  c.lista_train.checkpoint_every = 1000 # steps between checkpoints (a multiple of steps_per_call)
  c.lista_train.skip_nonfinite = False  # True: skip steps with a non-finite loss/gradient instead of stopping

  c.tf = ml_collections.ConfigDict()
  c.tf.small_tf_layers = 12       # Small TF: 12 blocks
  c.tf.small_tf_heads = 4         # 4 ReLU attention heads, D = 2d + 2 = 42
  c.tf.readout = "query"          # Small TF read-out for fig1a/fig1b: linear, query or query_dagger
  c.tf.small_tf_score_clip = 0.0  # 0: the paper's ReLU attention; c > 0 caps every attention weight
                                  # at c (not the paper's model; 10 trains without exploding
                                  # prompts, BUILD_NOTES "Training stability")
  c.tf.gpt2_layers = 12           # GPT-2: 12 layers
  c.tf.gpt2_width = 256           # embedding dimension 256
  c.tf.gpt2_heads = 8             # 8 heads
  c.tf.loss_on = "query"          # "query": loss on y_{N+1} (paper); "all": every prefix

  c.tf_train = ml_collections.ConfigDict()
  c.tf_train.steps = 1_000_000    # paper: 10^6 steps ("epochs") of 64 fresh instances
  c.tf_train.batch = 64           # instances per step
  c.tf_train.learning_rate = 1e-4 # Adam peak learning rate
  c.tf_train.warmup_steps = 1000  # linear warm-up
  c.tf_train.cosine_decay = True  # cosine decay to end_lr_factor x peak over the run
  c.tf_train.end_lr_factor = 0.1  # final learning rate / peak
  c.tf_train.clip_norm = 1.0      # global-norm gradient clipping (0: off)
  c.tf_train.eval_every = 10000   # steps between test-error evaluations (multiple of steps_per_call)
  c.tf_train.steps_per_call = 1000      # steps fused per jit call
  c.tf_train.checkpoint_every = 50000   # steps between checkpoints (multiple of steps_per_call)
  c.tf_train.skip_nonfinite = True      # skip steps with a non-finite loss/gradient instead of stopping: the
                                        # LayerNorm-free 12-layer Small TF meets rare exploding batches from
                                        # ~1,000-3,000 steps on (BUILD_NOTES); skips are logged and counted in
                                        # results.json; a chunk of only bad steps still stops the run

  c.eval = ml_collections.ConfigDict()
  c.eval.seed = 12345             # seed of the fixed test sets (independent of training data)
  c.eval.num_tasks = 4096         # test instances for the final numbers
  c.eval.curve_tasks = 1024       # test instances for the error-vs-training-step curves
  c.eval.lam = 0.1                # lam of the ISTA / FISTA / LASSO references
  c.eval.iters = 12               # K of the ISTA / FISTA references (paper: 12)
  c.eval.prompt_lengths = ""      # n values of the prompt-length curves ("" = 1..2N); values > N test
                                  # generalisation beyond the training length, on their own test set
                                  # of max(n) demonstrations. No separate max-length field: the list
                                  # sets it. GPT-2 is evaluated up to its position table (n <= N only).
  c.eval.classical_lams = "0.01,0.03,0.1,0.3,1.0"  # lam values of the classical table

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.keep = 3           # checkpoints kept per job
  c.log_every_s = 30.0            # seconds between progress lines
  return c
