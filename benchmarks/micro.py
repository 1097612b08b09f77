"""Micro-benchmarks behind implementation choices (not the issue's comparison suite, run.py).

  python -m benchmarks.micro                 # both
  python -m benchmarks.micro --only=dense    # ops.dense's weight gradient vs XLA's default (and torch)
  python -m benchmarks.micro --only=gpt2     # GPT-2 value_and_grad: the defaults vs remat off,
                                             # unrolled layers, jax.nn.dot_product_attention
  python -m benchmarks.micro --only=update   # the optimiser step on GPT-2's parameters: Adam with
                                             # train.make_step's scalar finiteness test vs testing
                                             # every leaf and selecting old/new state per leaf
  python -m benchmarks.micro --only=small_tf # Small TF query-loss value_and_grad: the defaults
                                             # (unrolled blocks, last block at the query only,
                                             # attention in 2 causal blocks) vs one block, vs
                                             # a rolled scan, vs every token in the last block
  python -m benchmarks.micro --only=small_tf_chunk  # the Small TF train chunk as benchmarks.run
                                             # times it: 2 (default), 1 and 3 causal blocks
                                             # (--causal-blocks=2,4,8 --n=80: other counts, length)
  python -m benchmarks.micro --only=allreduce # the same chunk: psum of the gradient pytree
                                             # (default) vs one flat gradient buffer
  python -m benchmarks.micro --only=microbatch # the same chunk: one backward pass per device
                                             # (default) vs gradient accumulation over 2 or 4
                                             # micro-batches
  taskset -c 0 python -m benchmarks.micro --only=gemm_shapes  # XLA:CPU GEMM time by shape (and
                                             # numpy's and torch's for the first shape)
  python -m benchmarks.micro --only=gemm_devices  # the weight-gradient GEMM on distinct operands,
                                             # one device vs every device at once
  python -m benchmarks.micro --only=small_tf_rusage  # the default Small TF train chunk: wall and
                                             # CPU time, page faults and context switches per step
  python -m benchmarks.micro --only=devices  # train chunks (ms per step) on one JAX CPU device vs
                                             # the host split into one device per core, data
                                             # parallel (experiments.main's default): Small TF,
                                             # LISTA-VM meta-training, GPT-2

Variants run interleaved in one process (repeats x variants) and report min and median ms, so
a slower or busier machine shifts every variant alike. Results print as a markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import time


def _time(fns: dict, repeats: int) -> dict:
  import jax
  for f in fns.values():
    jax.block_until_ready(f())           # compile / warm up
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, f in fns.items():
      if hasattr(f, "reset"):
        f.reset()                        # untimed
      t0 = time.perf_counter()
      jax.block_until_ready(f())
      times[k].append(time.perf_counter() - t0)
  return {k: (1e3 * min(v), 1e3 * statistics.median(v)) for k, v in times.items()}


def bench_dense(repeats: int, T: int = 1344, K: int = 256, N: int = 1024) -> dict:
  """Weight gradient x^T g of x (T, K) @ w (K, N): T = 64 prompts x 21 tokens, GPT-2's fc_w."""
  import jax
  import jax.numpy as jnp
  from l2o_jax.ops import dense
  x = jax.random.normal(jax.random.key(0), (T, K))
  w = jax.random.normal(jax.random.key(1), (K, N))
  g = jax.random.normal(jax.random.key(2), (T, N))
  # x and g are arguments, not closed-over constants, which XLA would fold at compile time.
  dw = lambda mm: jax.jit(jax.grad(lambda w, x, g: jnp.sum(mm(x, w) * g)))
  plain, ours = dw(lambda x, w: x @ w), dw(dense)
  fns = {f"XLA default x^T g ({T}x{K})^T({T}x{N})": lambda: plain(w, x, g),
         "ops.dense": lambda: ours(w, x, g)}
  out = _time(fns, repeats)
  try:
    import torch
    tx, tg = torch.randn(T, K), torch.randn(T, N)
    ts = []
    for _ in range(repeats + 1):
      t0 = time.perf_counter()
      tx.T @ tg
      ts.append(time.perf_counter() - t0)
    out["torch x.T @ g"] = (1e3 * min(ts[1:]), 1e3 * statistics.median(ts[1:]))
  except ImportError:
    pass
  return out


def bench_gpt2(repeats: int) -> dict:
  import jax
  from l2o_jax import sample_tasks
  from l2o_jax.transformer import gpt2
  params = gpt2.init(jax.random.key(0), d=20, max_points=11)
  t = sample_tasks(jax.random.key(1), 64, d=20, n=10)
  variants = {"defaults (scan, remat, einsum attention)": {}, "remat=False": {"remat": False},
              "unroll=12": {"unroll": 12}, 'attention="xla"': {"attention": "xla"}}
  fns = {}
  for name, kw in variants.items():
    f = jax.jit(jax.value_and_grad(lambda p, kw=kw: gpt2.loss(p, t.X, t.y, t.x_query, t.y_query, **kw)))
    fns[f"GPT-2 value_and_grad, batch 64: {name}"] = lambda f=f: f(params)
  return _time(fns, repeats)


def bench_update(repeats: int) -> dict:
  """Adam + finiteness handling on GPT-2's 9.5M parameters (gradients given): what
  `train.make_step` does after value_and_grad, against the per-leaf design it replaced."""
  import jax
  import jax.numpy as jnp
  import optax
  from l2o_jax import train
  from l2o_jax.transformer import gpt2
  params = gpt2.init(jax.random.key(0), d=20, max_points=11)
  grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 1e-3), params)
  opt = train.make_optimizer(1e-4, clip_norm=None)
  loss = jnp.float32(1.0)

  def scalar_test(params, opt_state, grads, loss):   # train.make_step (skip_nonfinite=False)
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, finite

  def per_leaf(params, opt_state, grads, loss):      # the former design: per-leaf test and select
    updates, new_opt = opt.update(grads, opt_state, params)
    new = optax.apply_updates(params, updates)
    ok = jnp.isfinite(loss) & train._all_finite(grads) & train._all_finite(new)
    keep = lambda a, b: jax.tree_util.tree_map(lambda x, y: jnp.where(ok, x, y), a, b)
    return keep(new, params), keep(new_opt, opt_state), optax.tree.norm(grads)

  def donated(f):
    # As in the train chunk: the state is donated and each call's output feeds the next.
    f = jax.jit(f, donate_argnums=(0, 1))
    state = [jax.tree_util.tree_map(jnp.copy, params), opt.init(params)]

    def call():
      out = f(*state, grads, loss)   # arguments, not constants XLA would fold at compile time
      state[:] = out[:2]
      return out
    return call

  return _time({f"GPT-2 Adam update (9.5M parameters), state donated: {name}": donated(f)
                for name, f in (("scalar loss/grad-norm test (train.make_step)", scalar_test),
                                ("every leaf tested, old/new selected per leaf", per_leaf))}, repeats)


def bench_small_tf(repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  from l2o_jax import sample_tasks
  from l2o_jax.transformer import small_tf as stf
  params = stf.small_tf_init(jax.random.key(0), d=20)
  t = sample_tasks(jax.random.key(1), 64, d=20, n=10)
  variants = {
      "defaults (unrolled, query-only last block, 2 causal blocks)":
          lambda p: stf._predict_query_batch(p, t.X, t.y, t.x_query),
      "attention over all (query, key) pairs (causal_blocks=1)":
          lambda p: stf._predict_query_batch(p, t.X, t.y, t.x_query, causal_blocks=1),
      "rolled lax.scan": lambda p: stf._predict_query_batch(p, t.X, t.y, t.x_query, unroll=1),
      "every token in the last block": lambda p: stf._predict_batch(p, t.X, t.y, t.x_query)[:, -1],
      "both (the previous default)": lambda p: stf._predict_batch(p, t.X, t.y, t.x_query, unroll=1)[:, -1],
  }
  fns = {}
  for name, pred in variants.items():
    f = jax.jit(jax.value_and_grad(lambda p, pred=pred: jnp.mean((t.y_query - pred(p)) ** 2)))
    fns[f"Small TF value_and_grad, batch 64, query loss: {name}"] = lambda f=f: f(params)
  return _time(fns, repeats)


def _chunk_call(objective, lr, steps, devices):
  """`benchmarks.run.OurTrainer`'s train chunk (plain Adam, data parallel over `devices`, each
  timed call from the state its first call left) as a call() for `_time`, with its untimed
  `reset`. Its first call, the compile, runs here."""
  from benchmarks.run import OurTrainer
  trainer = OurTrainer(objective, steps, lr=lr, devices=devices)
  call = lambda: trainer.run()
  call.reset = trainer.reset
  return call


def _small_tf_chunk_call(steps, n=10):
  """(row prefix, call) of the Small TF train chunk as benchmarks.run times it (query loss,
  batch 64, every CPU device data parallel; n demonstrations, T = 2n + 1 tokens). Module-level
  switches it reads (`small_tf.CPU_CAUSAL_BLOCKS`, `distributed.mean_value_and_grad`) take effect here."""
  import jax
  from benchmarks.run import TRAIN_LR
  from l2o_jax.transformer import make_objective
  call = _chunk_call(make_objective("small_tf", batch=64, n=n), TRAIN_LR["small_tf"], steps, jax.devices())
  return f"Small TF train chunk, batch 64, n = {n}, {jax.device_count()} devices", call


def bench_small_tf_chunk(repeats: int, steps: int = 10, n: int = 10, blocks_list=None) -> dict:
  """The Small TF train chunk (query loss, batch 64, every CPU device data parallel, as
  experiments.main and benchmarks.run train it) with the attention's query tokens in 1, 2 (the
  CPU default at n = 10) and 3 causal blocks (`small_tf.CPU_CAUSAL_BLOCKS`), or the counts in `blocks_list`
  (`--causal-blocks`), at prompt length n (`--n`). Rows are ms per train step."""
  from l2o_jax.transformer import small_tf as stf
  saved = stf.CPU_CAUSAL_BLOCKS
  default, fns = stf._causal_blocks(None, 2 * n + 1), {}
  for blocks in blocks_list or (default, 1, 3):
    stf.CPU_CAUSAL_BLOCKS = blocks   # read when the chunk is traced (its first call, in _chunk_call)
    try:
      prefix, call = _small_tf_chunk_call(steps, n)
    finally:
      stf.CPU_CAUSAL_BLOCKS = saved
    label = f"{blocks} causal block{'s' * (blocks > 1)}{' (default)' * (blocks == default)}"
    fns[f"{prefix}: {label}, ms per step"] = call
  return {k: (lo / steps, med / steps) for k, (lo, med) in _time(fns, repeats).items()}


def _flat_mean_value_and_grad(loss, params, batch, *, mesh):
  """`distributed.mean_value_and_grad` as it was before the eleventh session: the gradients
  raveled into one flat buffer (with the loss) before a single psum."""
  import jax
  import jax.numpy as jnp
  from jax.flatten_util import ravel_pytree
  from l2o_jax import distributed
  size = mesh.devices.size

  def local(params, batch):
    value, grads = jax.value_and_grad(loss)(params, batch)
    flat, unravel = ravel_pytree(grads)
    total = jax.lax.psum(jnp.concatenate([flat, value[None].astype(flat.dtype)]), distributed.AXIS) / size
    return total[-1].astype(value.dtype), unravel(total[:-1])

  return distributed.per_device(local, params, batch, mesh=mesh)


def bench_allreduce(repeats: int, steps: int = 10) -> dict:
  """The Small TF train chunk (as in `bench_small_tf_chunk`, every CPU device data parallel) with
  the gradient all-reduce of `distributed.mean_value_and_grad` (a psum of the gradient pytree,
  which XLA combines into one tuple all-reduce) against one flat buffer (ravel + concatenate, the
  former design). Rows are ms per train step."""
  from l2o_jax import distributed
  fns = _chunks_with_value_and_grad(
      {"all-reduce: psum of the gradient pytree (default)": distributed.mean_value_and_grad,
       "all-reduce: one flat buffer (ravel + concatenate)": _flat_mean_value_and_grad}, steps)
  return {k: (lo / steps, med / steps) for k, (lo, med) in _time(fns, repeats).items()}


def _microbatch_mean_value_and_grad(parts: int, rolled: bool):
  """`distributed.mean_value_and_grad` with each device's shard cut into `parts` micro-batches
  whose gradients are summed before the one psum (gradient accumulation), so each backward pass
  works on 1/parts of the activations, which then might stay in the core's L2. `rolled`: a lax.scan
  over the parts; else unrolled, each part sequenced after the previous by an optimization
  barrier (otherwise XLA may interleave them and lose the locality)."""
  import jax
  import jax.numpy as jnp
  from l2o_jax import distributed

  def split(x, i=None):
    if jnp.ndim(x) == 0:
      return x
    x = x.reshape((parts, x.shape[0] // parts) + x.shape[1:])
    return x if i is None else x[i]

  def mean_value_and_grad(loss, params, batch, *, mesh):
    size = mesh.devices.size

    def local(params, batch):
      vg = jax.value_and_grad(loss)
      if rolled:
        def body(acc, part):
          return jax.tree_util.tree_map(jnp.add, acc, vg(params, part)), None
        zero = (jnp.zeros(()), jax.tree_util.tree_map(jnp.zeros_like, params))
        acc = jax.lax.scan(body, zero, jax.tree_util.tree_map(split, batch))[0]
      else:
        acc = None
        for i in range(parts):
          part = jax.tree_util.tree_map(lambda x: split(x, i), batch)
          if acc is not None:
            part, acc = jax.lax.optimization_barrier((part, acc))
          out = vg(params, part)
          acc = out if acc is None else jax.tree_util.tree_map(jnp.add, acc, out)
      value, grads = jax.lax.psum(acc, distributed.AXIS)
      return value / (size * parts), jax.tree_util.tree_map(lambda g: g / (size * parts), grads)

    return distributed.per_device(local, params, batch, mesh=mesh)

  return mean_value_and_grad


def _chunks_with_value_and_grad(variants: dict, steps: int) -> dict:
  """{label: distributed.mean_value_and_grad replacement} -> {row: call} of the default Small TF
  train chunk (batch 64, every CPU device), each traced with its replacement."""
  from l2o_jax import distributed
  default, fns = distributed.mean_value_and_grad, {}
  for label, fn in variants.items():
    distributed.mean_value_and_grad = fn   # read by data_parallel, inside _chunk_call
    try:
      prefix, call = _small_tf_chunk_call(steps)
    finally:
      distributed.mean_value_and_grad = default
    fns[f"{prefix}, {label}, ms per step"] = call
  return fns


def bench_microbatch(repeats: int, steps: int = 10) -> dict:
  """The Small TF train chunk with each device's 32 prompts in one backward pass (default)
  against gradient accumulation over 2 or 4 micro-batches (`_microbatch_mean_value_and_grad`):
  does cache residency of the smaller activations pay for the extra, smaller GEMMs?"""
  from l2o_jax import distributed
  variants = {"whole shard (default)": distributed.mean_value_and_grad}
  for parts, rolled in ((2, True), (2, False), (4, True)):
    variants[f"{parts} micro-batches, {'rolled scan' if rolled else 'unrolled'}"] = \
        _microbatch_mean_value_and_grad(parts, rolled)
  fns = _chunks_with_value_and_grad(variants, steps)
  return {k: (lo / steps, med / steps) for k, (lo, med) in _time(fns, repeats).items()}


def bench_gemm_shapes(repeats: int) -> dict:
  """One jitted float32 x @ w per shape (M, K, N): Small TF's per-device GEMMs (672 = 32 prompts x
  21 tokens, D = 42, D' = M D = 168) next to padded / transposed variants. XLA:CPU's rate depends
  on the output width far more than on the FLOPs (BUILD_NOTES). Rows are ms per 100 calls (run on
  one core: `taskset -c 0`)."""
  import jax
  f = jax.jit(lambda x, w: x @ w)
  fns = {}
  # Then D padded 42 -> 48 (BUILD_NOTES, Known gaps): the same four orientations at K or N = 48.
  for M, K, N in ((672, 42, 168), (672, 42, 160), (672, 42, 192), (168, 42, 672),
                  (672, 168, 42), (672, 192, 42), (42, 672, 168), (168, 672, 42),
                  (672, 48, 168), (672, 168, 48), (48, 672, 168), (168, 672, 48)):
    x = jax.random.normal(jax.random.key(0), (M, K))
    w = jax.random.normal(jax.random.key(1), (K, N))

    def call(x=x, w=w):
      for _ in range(100):
        r = f(x, w)
      return r

    fns[f"GEMM ({M}x{K})({K}x{N}), {2 * M * K * N / 1e6:.2f} MFLOP: 100 calls"] = call
  # The same first product through numpy (its bundled OpenBLAS) and torch (one thread): whether
  # another library is faster on these shapes.
  import numpy as np
  a, b = np.random.randn(672, 42).astype(np.float32), np.random.randn(42, 168).astype(np.float32)
  fns["numpy (672x42)(42x168): 100 calls"] = lambda: [a @ b for _ in range(100)] and None
  try:
    import torch
    torch.set_num_threads(1)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    fns["torch (672x42)(42x168), 1 thread: 100 calls"] = lambda: [ta @ tb for _ in range(100)] and None
  except ImportError:
    pass
  return _time(fns, repeats)


def bench_gemm_devices(repeats: int, products: int = 50) -> dict:
  """Small TF's largest GEMM group in the step, the (42x672)(672x168) weight gradient, on distinct
  operands (not a repeated hot call): `products` of them summed in one program, on one device and
  on every CPU device at once (shard_map, each device its own operands). Rows are ms per
  `products` products per device; `taskset -c 0` gives the 1-device row on one core."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from l2o_jax.distributed import data_mesh

  def body(a, b):          # a (1, R, 42, 672), b (1, R, 672, 168): this device's operands
    acc = a[0, 0] @ b[0, 0]
    for i in range(1, products):
      acc = acc + a[0, i] @ b[0, i]
    return acc[None]

  fns = {}
  for label, devices in (("1 device", jax.devices()[:1]), (f"{jax.device_count()} devices at once", jax.devices())):
    mesh = data_mesh(devices)
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P("data")))
    n, shard = len(devices), NamedSharding(mesh, P("data"))
    a = jax.device_put(jax.random.normal(jax.random.key(0), (n, products, 42, 672)), shard)
    b = jax.device_put(jax.random.normal(jax.random.key(1), (n, products, 672, 168)), shard)
    fns[f"{products} x (42x672)(672x168) on distinct operands, {label}: ms per device"] = (
        lambda f=f, a=a, b=b: f(a, b))
  return _time(fns, repeats)


def bench_small_tf_rusage(repeats: int, steps: int = 10) -> dict:
  """Where the default Small TF train chunk's time goes at the OS level (getrusage around each
  call): wall ms, user and system CPU-ms, minor page faults and context switches, each per step.
  User CPU-ms near (devices x wall ms) means both cores compute throughout; few faults and
  little system time rule out allocation (fresh pages) and syscalls as a cost."""
  import resource
  import jax
  prefix, call = _small_tf_chunk_call(steps)
  rows = {k: [] for k in ("wall ms", "user CPU-ms", "system CPU-ms", "minor page faults",
                          "voluntary context switches", "involuntary context switches")}
  for _ in range(repeats):
    call.reset()
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    jax.block_until_ready(call())
    t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    for k, v in zip(rows, (1e3 * (t1 - t0), 1e3 * (r1.ru_utime - r0.ru_utime), 1e3 * (r1.ru_stime - r0.ru_stime),
                           r1.ru_minflt - r0.ru_minflt, r1.ru_nvcsw - r0.ru_nvcsw, r1.ru_nivcsw - r0.ru_nivcsw)):
      rows[k].append(v / steps)
  return {f"{prefix}: {k} per step": (min(v), statistics.median(v))
          for k, v in rows.items()}


def bench_devices(repeats: int) -> dict:
  """experiments.main's CPU data parallelism: the same train chunk on devices[:1] and on every
  CPU device (main() splits the host before JAX starts). Rows are ms per train step."""
  import jax
  from benchmarks.run import TRAIN_LR
  from l2o_jax import lista
  from l2o_jax.transformer import make_objective
  cases = {"Small TF (query loss, batch 64)": (lambda: make_objective("small_tf", batch=64), 10, TRAIN_LR["small_tf"]),
           "LISTA-VM meta (batch 500)": (lambda: lista.make_objective("lista_vm", protocol="meta", batch=500), 20, 1e-3),
           "GPT-2 (every prefix, batch 64)": (lambda: make_objective("gpt2", batch=64, loss_on="all"), 2, TRAIN_LR["gpt2"])}
  fns, steps_of = {}, {}
  for case, (make, steps, lr) in cases.items():
    for label, devices in (("1 device", jax.devices()[:1]), (f"{jax.device_count()} devices", jax.devices())):
      call = _chunk_call(make(), lr, steps, devices)
      name = f"{case}: {label}, ms per step"
      fns[name], steps_of[name] = call, steps
  return {k: (lo / steps_of[k], med / steps_of[k]) for k, (lo, med) in _time(fns, repeats).items()}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--only", default="dense,gpt2,update,small_tf",
                 help="comma-separated: dense, gpt2, update, small_tf, small_tf_chunk, allreduce, "
                      "microbatch, gemm_shapes, gemm_devices, small_tf_rusage, devices")
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--n", type=int, default=10, help="small_tf_chunk: demonstrations per prompt")
  p.add_argument("--causal-blocks", default=None,
                 help="small_tf_chunk: comma-separated causal block counts (default: the CPU default at --n, 1 and 3)")
  args = p.parse_args(argv)
  import jax
  if {"devices", "gemm_devices", "small_tf_chunk", "small_tf_rusage", "allreduce", "microbatch"} & set(args.only.split(",")):
    from l2o_jax import distributed
    distributed.set_cpu_devices(max(2, distributed.usable_cores()))   # before any JAX computation
  rows = {}
  for name in args.only.split(","):
    rows.update({"dense": bench_dense, "gpt2": bench_gpt2, "update": bench_update, "small_tf": bench_small_tf,
                 "small_tf_chunk": lambda r: bench_small_tf_chunk(
                     r, n=args.n, blocks_list=args.causal_blocks and [int(b) for b in args.causal_blocks.split(",")]),
                 "allreduce": bench_allreduce,
                 "microbatch": bench_microbatch,
                 "gemm_shapes": bench_gemm_shapes, "gemm_devices": bench_gemm_devices,
                 "small_tf_rusage": bench_small_tf_rusage,
                 "devices": bench_devices}[name](args.repeats))
  print(f"device: {jax.devices()[0].device_kind}; repeats {args.repeats}\n")
  print("| variant (ms unless it names another unit) | min | median |\n|---|---:|---:|")
  for k, (lo, med) in rows.items():
    print(f"| {k} | {lo:.1f} | {med:.1f} |")


if __name__ == "__main__":
  main()
