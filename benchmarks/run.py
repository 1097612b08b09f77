"""Benchmark suite (issue 6): l2o_jax against the PyTorch peers and scikit-learn.

  python -m benchmarks.run --quick                  # a few minutes on a laptop CPU
  python -m benchmarks.run                          # the full suite
  python -m benchmarks.run --only=gpt2,small_tf --repeats=7
  python -m benchmarks.run --device=gpu --only=gpt2,small_tf --batches=64,256 --steps=50
  bash benchmarks/gpu_session.sh                    # every GPU check of issue 6, one device call

Benchmarks (--only picks a subset):
  gpt2       GPT-2 train step (12 x 256, 8 heads) vs the HF transformers peer (`torch_peer.py`)
  small_tf   Small TF train step vs our straightforward PyTorch port ("our port")
  lista_vm   LISTA-VM meta-training throughput (no peer)
  inference  tasks/s of ISTA, FISTA, LISTA-VM and the constructed Transformer at 12 layers
  lasso      batched `l2o_jax.lasso` vs a per-instance scikit-learn `Lasso` loop, matched accuracy
  scaling    time per step against the prompt length N and the dimension d

Training steps are timed in steady state: a chunk of --steps fused steps per jit call
(`train.make_train_chunk`: on-device sampling, donated state), the first call reported as
compile time, then --repeats calls timed with `jax.block_until_ready`, median reported. Every
timed call starts from the state the first call left (restored untimed), so each repeat times the
same healthy stretch of training: the LayerNorm-free Small TF under plain Adam at lr 1e-4 goes
non-finite after ~130-400 steps on both sides, and a diverged run times NaN arithmetic (a final
loss that is still non-finite is flagged in the report). Ours and the peer alternate call by call,
so load from other processes hits both alike. A trace
counter checks that each train chunk compiles once. On a CPU our train steps run as
`experiments.main` trains them: the host split into one JAX device per core (`--cpu-devices`),
the batch data parallel over them; the peer uses as many torch threads as there are cores.

Results: a JSON file in benchmarks/results/ and a section appended to benchmarks/RESULTS.md
(machine, device, versions, date and the command line).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

BENCHMARKS = ("gpt2", "small_tf", "lista_vm", "inference", "lasso", "scaling")
HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="small sizes and few repeats (minutes)")
  p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
  p.add_argument("--device", default="cpu", choices=("cpu", "gpu"), help="JAX platform and torch device")
  p.add_argument("--steps", type=int, default=None, help="train steps per timed call (default 5 quick, 10 full; 100 on gpu)")
  p.add_argument("--repeats", type=int, default=None, help="timed calls per measurement (default 3 quick, 5 full)")
  p.add_argument("--batches", default=None, help="train batch sizes (default 64 quick, 64,256 full)")
  p.add_argument("--no-peer", action="store_true", help="skip the PyTorch peers")
  p.add_argument("--tasks", type=int, default=None, help="inference tasks (default 2e4 quick, 1e5 full)")
  p.add_argument("--sklearn-tasks", type=int, default=None, help="tasks in the scikit-learn loop (default 200 quick, 1000 full)")
  p.add_argument("--lasso-chunk", type=int, default=64, help="tasks per jit(vmap(lasso)) call (also timed: all at once)")
  p.add_argument("--cpu-devices", type=int, default=0,
                 help="CPU only: JAX devices to split the host into for our train steps, "
                      "data parallel (default 0: one per core, reduced to divide every batch with >= 16 instances each; 1: off)")
  p.add_argument("--threads", type=int, default=None, help="torch threads (default: the cores this process may use, as XLA)")
  p.add_argument("--matmul-precision", default="float32", choices=("float32", "tf32"),
                 help="GPU only, both sides: float32 matmuls (default; torch's default, while JAX's "
                      "default precision lets XLA use TF32 on NVIDIA GPUs) or TF32 tensor-core matmuls "
                      "for both. CPU matmuls are float32 either way")
  p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<date>.json)")
  p.add_argument("--no-md", action="store_true", help="do not append to benchmarks/RESULTS.md")
  args = p.parse_args(argv)
  only = [s for s in args.only.split(",") if s] or list(BENCHMARKS)
  unknown = sorted(set(only) - set(BENCHMARKS))
  if unknown:
    p.error(f"--only: unknown benchmark(s) {unknown}; expected some of {BENCHMARKS}")
  args.only = only
  gpu = args.device == "gpu"
  args.steps = args.steps or (100 if gpu else 5 if args.quick else 10)
  args.repeats = args.repeats or (3 if args.quick else 5)
  args.batches = [int(b) for b in (args.batches or ("64" if args.quick else "64,256")).split(",")]
  args.tasks = args.tasks or (20_000 if args.quick else 100_000)
  args.sklearn_tasks = args.sklearn_tasks or (200 if args.quick else 1000)
  if args.cpu_devices < 0:
    p.error(f"--cpu-devices: expected >= 0 (0 = one per core), got {args.cpu_devices}")
  return args


# ---------------------------------------------------------------------------------------------
# Timing helpers.


def _median(xs):
  return float(statistics.median(xs))


class OurTrainer:
  """A train chunk of `steps` fused steps; `compile_s` is the first call (trace + compile + run).
  Each timed call starts from the state that first call left (`reset`, untimed): the chunk
  donates its input, so that state is kept as a copy."""

  def __init__(self, objective, steps, lr=1e-4, devices=None):
    import jax
    from l2o_jax import distributed, train
    self.traces = 0
    inner = objective.loss

    def loss(params, batch):
      self.traces += 1      # runs at trace time only
      return inner(params, batch)

    objective = objective._replace(loss=loss)
    optimizer = train.make_optimizer(lr, clip_norm=None)   # plain Adam, as the peers
    self.steps = steps
    self.state = train.init_state(objective, optimizer, 0)
    if devices is not None and len(devices) > 1:   # as experiments.main trains on a CPU host
      mesh = distributed.data_mesh(devices)
      objective = distributed.data_parallel(objective, mesh)
      self.state = distributed.replicate(self.state, mesh)
    self.chunk = train.make_train_chunk(objective, optimizer, steps)
    t0 = time.perf_counter()
    self.run()
    self.compile_s = time.perf_counter() - t0
    self.start = jax.tree_util.tree_map(lambda x: x.copy(), self.state)

  def reset(self) -> None:
    """Puts back the state the first call left."""
    import jax
    self.state = jax.block_until_ready(jax.tree_util.tree_map(lambda x: x.copy(), self.start))

  def run(self):
    """One chunk from the current state, waited for; returns the new state."""
    import jax
    self.state, metrics = self.chunk(self.state)
    jax.block_until_ready(self.state)
    self.loss = float(metrics["loss"][-1])
    return self.state

  def __call__(self) -> float:
    """Seconds per step over one chunk, from the state after the first call (restored untimed)."""
    self.reset()
    t0 = time.perf_counter()
    self.run()
    return (time.perf_counter() - t0) / self.steps


class PeerTrainer:
  """`steps` calls of a torch step; the first call (warm-up) is reported like a compile time."""

  def __init__(self, step, steps, device):
    from benchmarks import torch_peer
    self.step, self.steps, self.device, self.sync = step, steps, device, torch_peer.synchronize
    t0 = time.perf_counter()
    self.loss = float(step())
    self.sync(device)
    self.compile_s = time.perf_counter() - t0
    self.traces = None
    self.start = torch_peer.snapshot(step)

  def __call__(self) -> float:
    """Seconds per step over `steps` steps, from the state after the warm-up (untimed restore)."""
    from benchmarks import torch_peer
    torch_peer.restore(self.step, self.start)
    self.sync(self.device)
    t0 = time.perf_counter()
    for _ in range(self.steps):
      loss = self.step()
    self.loss = float(loss)   # a host sync, as a user's logging would do
    self.sync(self.device)
    return (time.perf_counter() - t0) / self.steps


def _interleave(runners: dict, repeats: int) -> dict:
  times = {k: [] for k in runners}
  for _ in range(repeats):
    for k, run in runners.items():
      times[k].append(run())
  return times


def _train_row(bench, impl, runner, times, batch, **extra):
  step_s = _median(times)
  row = {"bench": bench, "impl": impl, "batch": batch, "step_ms": 1e3 * step_s,
         "step_ms_min": 1e3 * min(times), "steps_per_s": 1.0 / step_s, "instances_per_s": batch / step_s,
         "compile_s": runner.compile_s, "projected_1e6_steps_h": step_s * 1e6 / 3600.0,
         "final_loss": runner.loss, "repeats": len(times),
         "step_ms_each": [round(1e3 * t, 3) for t in times]}
  if not math.isfinite(runner.loss):
    row["diverged"] = True
    print(f"WARNING: {bench} {impl}: the last timed call ended with a non-finite loss ({runner.loss}); "
          "its step time is of NaN arithmetic, not of healthy training", file=sys.stderr)
  if runner.traces is not None:
    row["traces"] = runner.traces
  row.update(extra)
  return row


def _ratio_row(bench, batch, ours, peer, label):
  """The ratio of the medians (the headline), of the minima, and the spread of the paired ratios:
  the two sides alternate call by call, so repeat i of each ran at nearly the same moment and
  peer_i / ours_i shows how much the machine's load moved the headline."""
  paired = sorted(p / o for p, o in zip(peer["step_ms_each"], ours["step_ms_each"]))
  return {"bench": bench, "impl": f"ratio ({label} / l2o_jax step time)", "batch": batch,
          "ratio": peer["step_ms"] / ours["step_ms"],
          "ratio_min": peer["step_ms_min"] / ours["step_ms_min"],
          "ratio_paired_median": _median(paired), "ratio_paired_range": [paired[0], paired[-1]]}


# ---------------------------------------------------------------------------------------------
# Benchmarks. Each returns a list of result rows (dicts).


def _transformer_objective(model, batch, d=20, n=10):
  from l2o_jax.transformer import make_objective
  # GPT-2 trains on every prefix (Garg et al., as the peer); Small TF on the query (the paper).
  return make_objective(model, d=d, n=n, batch=batch, loss_on="all" if model == "gpt2" else "query")


# Adam's learning rate per model, the same on both sides (it does not change the arithmetic, so not
# the step time, only whether the timed steps stay finite). GPT-2: Garg et al.'s 1e-4. Small TF has
# no LayerNorm, and under plain Adam at 1e-4 without warm-up it goes non-finite after ~130-400
# steps on both sides (a GPU chunk is 200 steps); at 1e-5 it stayed finite over 1,000 steps (ours)
# and 500 (the port), measured 2026-12-02 (BUILD_NOTES).
TRAIN_LR = {"gpt2": 1e-4, "small_tf": 1e-5}


def bench_train(model, args, ctx, *, d=20, n=10, batches=None, tag=None):
  rows = []
  lr = TRAIN_LR[model]
  for batch in batches or args.batches:
    runners = {"l2o_jax": OurTrainer(_transformer_objective(model, batch, d, n), args.steps, lr=lr,
                                     devices=ctx["train_devices"])}
    if not args.no_peer:   # torch (the bench extra) is imported only for the peers
      from benchmarks import torch_peer
      if model == "gpt2":
        step = torch_peer.make_gpt2_peer(d=d, n=n, batch=batch, lr=lr, device=ctx["torch_device"])
        runners["torch HF GPT2Model"] = PeerTrainer(step, args.steps, ctx["torch_device"])
      else:
        # The target's comparator (a straightforward port), and the same port with our step's
        # FLOP-saving rewrites: the ratio to the second is the framework-to-framework one.
        for label, same_flops in (("torch (our port)", False), ("torch (our port, same FLOP savings)", True)):
          if same_flops and tag:
            continue   # the scaling rows keep one peer
          step = torch_peer.make_small_tf_port(d=d, n=n, batch=batch, lr=lr, device=ctx["torch_device"],
                                               same_flops=same_flops)
          runners[label] = PeerTrainer(step, args.steps, ctx["torch_device"])
    times = _interleave(runners, args.repeats)
    extra = {"d": d, "n": n, "lr": lr}
    if tag:
      extra["scan"] = tag
    ours = _train_row(model, "l2o_jax", runners["l2o_jax"], times["l2o_jax"], batch, **extra)
    rows.append(ours)
    for label in runners:
      if label != "l2o_jax":
        peer = _train_row(model, label, runners[label], times[label], batch, **extra)
        rows += [peer, {**_ratio_row(model, batch, ours, peer, label), **extra}]
    _log(rows[-(2 * len(runners) - 1):])   # ours, then a row and a ratio row per peer
  return rows


def bench_lista_vm(args, ctx):
  from l2o_jax import lista
  rows = []
  for batch in ([500] if args.quick else [500, 5000]):
    obj = lista.make_objective("lista_vm", protocol="meta", batch=batch)
    devices = ctx["train_devices"] if batch % len(ctx["train_devices"]) == 0 else None
    runner = OurTrainer(obj, args.steps, lr=1e-3, devices=devices)
    times = _interleave({"ours": runner}, args.repeats)["ours"]
    rows.append(_train_row("lista_vm", "l2o_jax (meta)", runner, times, batch, d=20, n=10, layers=12))
    _log(rows[-1:])
  return rows


def _time_batched(fn, inputs, chunk, repeats):
  """tasks/s of a jitted batched fn over all tasks, in chunks of `chunk` (one compile)."""
  import jax
  total = inputs[0].shape[0]
  parts = [tuple(a[i:i + chunk] for a in inputs) for i in range(0, total, chunk)]
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*parts[0]))
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    outs = [fn(*p) for p in parts]
    jax.block_until_ready(outs)
    times.append(time.perf_counter() - t0)
  return total / _median(times), compile_s, outs


def bench_inference(args, ctx):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from l2o_jax import fista, ista, lista, sample_tasks
  from l2o_jax.transformer import construct_lista_vm_transformer, transformer_forward, embed
  from l2o_jax.transformer.embedding import beta_rows

  K, d, n, lam = 12, 20, 10, lista.DEFAULT_LAM
  task = sample_tasks(jax.random.key(0), args.tasks, d=d, n=n)
  inputs = (task.X, task.y, task.x_query)
  vm = lista.lista_vm_init(jax.random.key(1), K, d, n=n, lam=lam)
  body = construct_lista_vm_transformer(vm, 1e4)

  def tf_beta(X, y, q):
    return transformer_forward(body, embed(X, y, q))[beta_rows(d), -1]

  methods = {
      "ISTA": lambda X, y, q: ista(X, y, lam, K),
      "FISTA": lambda X, y, q: fista(X, y, lam, K),
      "LISTA-VM": lambda X, y, q: lista.lista_vm(vm, X, y),
      "constructed Transformer (LISTA-VM)": tf_beta,
  }
  rows, outs = [], {}
  chunk = min(10_000, args.tasks)
  for name, f in methods.items():
    fn = jax.jit(jax.vmap(f))
    rate, compile_s, out = _time_batched(fn, inputs, chunk, args.repeats)
    outs[name] = jnp.concatenate(out)
    rows.append({"bench": "inference", "impl": name, "layers": K, "tasks": args.tasks, "chunk": chunk,
                 "tasks_per_s": rate, "compile_s": compile_s})
    _log(rows[-1:])
  # The constructed Transformer must compute LISTA-VM (Theorem 4.1): a correctness check on the
  # very outputs that were timed.
  diff = float(jnp.max(jnp.abs(outs["constructed Transformer (LISTA-VM)"] - outs["LISTA-VM"])))
  rows[-1]["max_abs_diff_vs_lista_vm"] = diff
  return rows


def _np_rel_gaps(X, y, beta, lam):
  """Relative duality gaps gap / max(1, ||y||^2/2) of a batch (the `duality_gap` formula), float64."""
  import numpy as np
  X, y, beta = (np.asarray(a, np.float64) for a in (X, y, beta))
  r = y - np.einsum("bnd,bd->bn", X, beta)
  g = np.einsum("bnd,bn->bd", X, r)
  s = np.minimum(1.0, lam / np.maximum(np.max(np.abs(g), axis=1), 1e-300))
  gap = 0.5 * (1 - s) ** 2 * np.sum(r * r, axis=1) + np.sum(lam * np.abs(beta) - s[:, None] * beta * g, axis=1)
  return gap / np.maximum(1.0, 0.5 * np.sum(y * y, axis=1))


def bench_lasso(args, ctx):
  import warnings
  import jax
  import jax.numpy as jnp
  import numpy as np
  from sklearn.exceptions import ConvergenceWarning
  from sklearn.linear_model import Lasso
  from l2o_jax import lasso, lasso_batch, lista, sample_tasks

  d, n, lam, tol = 20, 10, lista.DEFAULT_LAM, 1e-5
  # The jit(vmap(lasso)) and FISTA rows are slow, so they run on at most 10^4 tasks; the default
  # lasso_batch (homotopy) runs on all --tasks. Every row's first tasks are the same instances.
  ours_tasks = max(args.sklearn_tasks, min(args.tasks, 10_000))
  big_tasks = max(args.sklearn_tasks, args.tasks)
  task = sample_tasks(jax.random.key(3), big_tasks, d=d, n=n)
  small = (task.X[:ours_tasks], task.y[:ours_tasks])
  fn = jax.jit(jax.vmap(lambda X, y: lasso(X, y, lam, tol)))
  # A vmapped while_loop runs until the batch's slowest instance converges (iterations: median
  # ~120, max ~2000 at tol 1e-5), so smaller chunks waste less; both chunk sizes are reported.
  ours_rows, betas = [], []
  for chunk in sorted({min(args.lasso_chunk, ours_tasks), ours_tasks}):
    rate, compile_s, out = _time_batched(fn, small, chunk, args.repeats)
    ours_rows.append({"bench": "lasso", "impl": f"l2o_jax.lasso (jit(vmap), chunks of {chunk}, float32)",
                      "tasks": ours_tasks, "chunk": chunk, "tasks_per_s": rate, "compile_s": compile_s, "tol": tol})
    betas.append(jnp.concatenate(out))

  def timed_batch(X, y, impl, **kw):
    t0 = time.perf_counter()
    lasso_batch(X, y, lam, tol, **kw).beta.block_until_ready()   # compiles every shape it needs
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(max(1, args.repeats)):
      t0 = time.perf_counter()
      info = lasso_batch(X, y, lam, tol, **kw)
      info.beta.block_until_ready()
      times.append(time.perf_counter() - t0)
    iters = np.asarray(info.num_iters)
    ours_rows.append({"bench": "lasso", "impl": impl, "tasks": X.shape[0], "chunk": "all",
                      "tasks_per_s": X.shape[0] / _median(times), "compile_s": compile_s, "tol": tol,
                      "certified": float(np.mean(info.converged)), "iters_median": float(np.median(iters)),
                      "iters_max": int(iters.max())})
    betas.append(info.beta)

  # lasso_batch, method="fista": the FISTA solver above with converged instances dropped between rounds.
  timed_batch(*small, "l2o_jax.lasso_batch (FISTA, rounds + compaction, float32)", method="fista")
  # lasso_batch, default method="homotopy": LARS-LASSO path, exact after ~7 kinks; iters = path steps.
  timed_batch(task.X, task.y, "l2o_jax.lasso_batch (homotopy, float32)")
  X, y = np.asarray(task.X, np.float64), np.asarray(task.y, np.float64)
  for r, beta in zip(ours_rows, betas):
    gaps = _np_rel_gaps(X[:r["tasks"]], y[:r["tasks"]], beta, lam)
    r.update(rel_gap_median=float(np.median(gaps)), rel_gap_max=float(np.max(gaps)))
  # scikit-learn minimises (1/2n)||y - Xb||^2 + alpha||b||_1: alpha = lam / n. Its coordinate
  # descent stops when the gap of (1/2)||y - Xb||^2 + lam||b||_1 is below tol_sk ||y||^2, ours
  # when it is below tol max(1, ||y||^2 / 2): tol_sk = tol / 2 asks for the same accuracy.
  m = args.sklearn_tasks
  sk = np.zeros((m, d))
  sk_iters = np.zeros(m, int)
  times = []
  for rep in range(max(1, min(args.repeats, 3))):
    t0 = time.perf_counter()
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", ConvergenceWarning)
      for i in range(m):
        model = Lasso(alpha=lam / n, fit_intercept=False, tol=tol / 2, max_iter=100_000)
        sk[i] = model.fit(X[i], y[i]).coef_
        sk_iters[i] = model.n_iter_
    times.append(time.perf_counter() - t0)
  sk_rate = m / _median(times)
  gap_sk = _np_rel_gaps(X[:m], y[:m], sk, lam)
  best_i = max(range(len(ours_rows)), key=lambda i: ours_rows[i]["tasks_per_s"])
  best = ours_rows[best_i]
  rows = ours_rows + [
      {"bench": "lasso", "impl": "sklearn Lasso loop (float64)", "tasks": m, "tasks_per_s": sk_rate,
       "tol": tol / 2, "rel_gap_median": float(np.median(gap_sk)), "rel_gap_max": float(np.max(gap_sk)),
       "iters_median": float(np.median(sk_iters)), "iters_max": int(sk_iters.max())},
      {"bench": "lasso", "impl": f"ratio ({best['impl']} / sklearn tasks/s)",
       "ratio": best["tasks_per_s"] / sk_rate,
       # Off the LASSO's unique solution only where it is not unique (n < d) or within the tolerance.
       "max_abs_beta_diff": float(np.max(np.abs(np.asarray(betas[best_i], np.float64)[:m] - sk)))},
  ]
  _log(rows)
  return rows


def bench_scaling(args, ctx):
  rows = []
  Ns = (10, 40) if args.quick else (10, 20, 40, 80)
  ds = (20, 80) if args.quick else (20, 40, 80)
  batch = args.batches[0]
  # The shape of the curve only: fewer steps per point (GPT-2 at N = 80 is ~8x the N = 10 step).
  cap = 2 if args.quick else 3
  args = argparse.Namespace(**{**vars(args), "steps": min(args.steps, cap), "repeats": min(args.repeats, cap)})
  for model in ("small_tf", "gpt2"):
    for n in Ns:
      rows += bench_train(model, args, ctx, d=20, n=n, batches=[batch], tag="N")
    for d in ds:
      if d != 20:
        rows += bench_train(model, args, ctx, d=d, n=10, batches=[batch], tag="d")
  return [dict(r, bench="scaling/" + r["bench"]) for r in rows]


# ---------------------------------------------------------------------------------------------
# Reporting.


def _log(rows):
  for r in rows:
    # Six significant digits, not decimals: the Small TF learning rate 1e-5 printed as 0.0.
    print("  " + json.dumps({k: (float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in r.items()}), flush=True)


def _environment(args):
  import jax
  env = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
         "command": "python -m benchmarks.run " + " ".join(args.argv), "python": platform.python_version(),
         "machine": platform.machine(), "cpu_count": os.cpu_count(), "cpu": _cpu_model(),
         "jax_device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}",
         "jax_devices": jax.device_count(),
         "load_avg_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
  for mod in ("jax", "jaxlib", "flax", "optax", "numpy", "sklearn", "torch", "transformers"):
    try:
      env[mod] = __import__(mod).__version__
    except ImportError:
      env[mod] = None
  return env


def _cpu_model():
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def _fmt(v, digits=3):
  if isinstance(v, float):
    return f"{v:,.0f}" if abs(v) >= 10 ** digits else f"{v:.{digits}g}"
  return "" if v is None else str(v)


def to_markdown(env, rows) -> str:
  lines = [f"## {env['date_utc']} -- `{env['command']}`", ""]
  lines.append(f"- machine: {env['cpu']} ({env['machine']}, {env['cpu_count']} cores), "
               f"JAX device {env['jax_device']}"
               + (f" x {env['jax_devices']} (train steps data parallel over them)" if env.get("jax_devices", 1) > 1 else "")
               + f", torch device {env.get('torch_device')}; threads: XLA all "
               f"{env['cpu_count']} cores, torch {env.get('torch_threads')} "
               f"(default was {env.get('torch_default_threads')}); load average at start {_fmt(env['load_avg_start'])}")
  if env.get("matmul_precision"):
    lines.append(f"- matmul precision (ours and the peer's): {env['matmul_precision']}")
  lines.append("- versions: " + ", ".join(f"{k} {env[k]}" for k in
                                          ("python", "jax", "jaxlib", "flax", "optax", "numpy", "sklearn", "torch", "transformers")
                                          if env.get(k)))
  lines.append("")
  train = [r for r in rows if "step_ms" in r or (r["bench"] != "lasso" and "ratio" in r)]
  if train:
    lines += ["| bench | impl | batch | N | d | step ms (median) | step ms (min) | steps/s | instances/s | "
              "compile s | 10^6 steps (h) | ratio | ratio of minima | paired ratios (median, range) | traces |",
              "|" + "---|" * 15]
    for r in train:
      if r.get("diverged"):
        r = {**r, "impl": f"{r['impl']} (non-finite loss: not healthy training)"}
      paired = r.get("ratio_paired_range")
      paired = (f"{_fmt(r['ratio_paired_median'])} ({_fmt(paired[0])}-{_fmt(paired[1])})"
                if paired else "")
      lines.append("| " + " | ".join([_fmt(r.get(k)) for k in
                                      ("bench", "impl", "batch", "n", "d", "step_ms", "step_ms_min", "steps_per_s",
                                       "instances_per_s", "compile_s", "projected_1e6_steps_h", "ratio",
                                       "ratio_min")] + [paired, _fmt(r.get("traces"))]) + " |")
    lines.append("")
  inf = [r for r in rows if r["bench"] == "inference"]
  if inf:
    lines += ["| inference (12 layers) | tasks | tasks/s | compile s |", "|---|---|---|---|"]
    for r in inf:
      lines.append(f"| {r['impl']} | {r['tasks']:,} | {_fmt(r['tasks_per_s'])} | {_fmt(r['compile_s'])} |")
    diff = inf[-1].get("max_abs_diff_vs_lista_vm")
    if diff is not None:
      lines.append(f"\nConstructed Transformer vs LISTA-VM on the timed outputs: max |diff| = {diff:.2e}.")
    lines.append("")
  las = [r for r in rows if r["bench"] == "lasso"]
  if las:
    lines += ["| LASSO (d=20, n=10, lam=0.1) | tasks | tasks/s | tol | rel. gap median | rel. gap max | ratio |",
              "|---|---|---|---|---|---|---|"]
    for r in las:
      lines.append("| " + " | ".join(_fmt(r.get(k)) for k in
                                     ("impl", "tasks", "tasks_per_s", "tol", "rel_gap_median", "rel_gap_max", "ratio")) + " |")
    lines.append("\nAccuracy is matched on the certificate: both solutions' duality gaps, recomputed in float64, "
                 "relative to max(1, ||y||^2/2) (max |beta_ours - beta_sklearn| = "
                 f"{_fmt(las[-1].get('max_abs_beta_diff'))}).\n")
  return "\n".join(lines) + "\n"


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  args = parse_args(argv)
  args.argv = argv
  # Before jax is imported: the platform, and quiet logs.
  os.environ["JAX_PLATFORMS"] = "cuda" if args.device == "gpu" else "cpu"
  import jax
  from l2o_jax import distributed
  if args.device == "cpu":   # before the first JAX computation, as experiments.main does
    distributed.set_cpu_devices(args.cpu_devices or distributed.auto_cpu_devices(args.batches))
  else:   # the same matmul precision on both sides (--matmul-precision)
    jax.config.update("jax_default_matmul_precision",
                      {"float32": "highest", "tf32": "tensorfloat32"}[args.matmul_precision])
  # Our train steps run data parallel over the CPU devices, which share the cores the peer's
  # threads use; on a GPU host, one GPU against the peer's one.
  ctx = {"torch_device": "cuda" if args.device == "gpu" else "cpu",
         "train_devices": jax.devices() if args.device == "cpu" else jax.devices()[:1]}
  env = _environment(args)
  needs_torch = not args.no_peer and any(b in args.only for b in ("gpt2", "small_tf", "scaling"))
  if needs_torch:
    import torch
    env["torch_default_threads"] = torch.get_num_threads()
    from l2o_jax import distributed
    threads = args.threads or distributed.usable_cores()   # the cores this process may use (affinity)
    if args.device == "cpu" and torch.get_num_threads() != threads:
      torch.set_num_threads(threads)  # the same number of cores as XLA uses
    env["torch_threads"] = torch.get_num_threads()
    env["torch_device"] = ctx["torch_device"]
    if args.device == "gpu":
      torch.backends.cuda.matmul.allow_tf32 = args.matmul_precision == "tf32"
  if args.device == "gpu":
    env["matmul_precision"] = args.matmul_precision
  print(json.dumps(env), flush=True)
  out = args.out or os.path.join(HERE, "results", datetime.datetime.now(datetime.timezone.utc)
                                 .strftime("%Y%m%dT%H%M%SZ") + ".json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  rows = []
  for name in args.only:
    print(f"[{name}]", flush=True)
    t0 = time.perf_counter()
    if name in ("gpt2", "small_tf"):
      rows += bench_train(name, args, ctx)
    else:
      rows += globals()[f"bench_{name}"](args, ctx)
    print(f"[{name}] {time.perf_counter() - t0:.1f}s", flush=True)
    # Rewritten after every benchmark: a run stopped early (a time limit) keeps what it measured.
    with open(out, "w") as f:
      json.dump({"env": env, "results": rows, "complete": name == args.only[-1]}, f, indent=1)
  md = to_markdown(env, rows)
  print(md)
  if not args.no_md:
    with open(os.path.join(HERE, "RESULTS.md"), "a") as f:
      f.write("\n" + md)
  print(f"wrote {out}")
  return rows


if __name__ == "__main__":
  main()
