"""Where a train step's time goes: one profiled train chunk, aggregated per compiled HLO op.

  python -m benchmarks.profile --model=small_tf        # the query-loss Small TF step (batch 64)
  python -m benchmarks.profile --model=gpt2 --steps=5  # the GPT-2 step (loss on every prefix)

Runs `train.make_train_chunk` once to compile, then once under `jax.profiler.trace` with a
perfetto trace, sums each op's durations (ms per step; ops that use the thread pool count once
per thread, so the total can exceed the wall time) and groups them by (op kind, output shape,
source op) from the compiled HLO. The first table splits the total into GEMMs (`ynn_fusion*`,
`dot*`: XLA:CPU's YNNPACK and Eigen matmuls) and the other op kinds; the last table places the
data-parallel synchronisation (`Rendezvous`, `Wait: ...`) inside the HLO op that waits. This is how the numbers in
BUILD_NOTES ("~13 of ~70 ms in the scan's residual plumbing", "~720 of ~1,040 profiled ms are
GEMMs") were found.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile


def profile(model: str, steps: int, top: int, cpu_devices: int = 1, batch: int = 64, n: int = 10) -> str:
  import jax
  from l2o_jax import distributed, train
  from l2o_jax.transformer import make_objective
  distributed.set_cpu_devices(cpu_devices)
  objective = make_objective(model, d=20, n=n, batch=batch, loss_on="all" if model == "gpt2" else "query")
  optimizer = train.make_optimizer(1e-4, clip_norm=None)
  state = train.init_state(objective, optimizer, 0)
  if cpu_devices > 1:   # data parallel, as benchmarks.run and experiments.main train on a CPU host
    mesh = distributed.data_mesh()
    objective = distributed.data_parallel(objective, mesh)
    state = distributed.replicate(state, mesh)
  chunk = train.make_train_chunk(objective, optimizer, steps)
  hlo = chunk.lower(state).compile().as_text()   # before the call: the chunk donates `state`
  state, _ = chunk(state)
  jax.block_until_ready(state)
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      state, _ = chunk(state)
      jax.block_until_ready(state)
    events = json.load(gzip.open(glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)[0]))
  events = events["traceEvents"] if isinstance(events, dict) else events
  per_op = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and "dur" in e and not e["name"].startswith("$") and "Thunk" not in e["name"]:
      per_op[e["name"]] += e["dur"] / 1e3 / steps
  source = {}
  for line in hlo.splitlines():
    m = re.match(r'\s*(?:ROOT )?%(\S+) = (\S+) .*?op_name="([^"]*)"', line)
    if m:
      # transpose(jvp(...)) marks the backward pass
      source[m.group(1)] = (m.group(2), re.sub(r"^jit\(chunk\)/while/body/(closed_call/)?", "", m.group(3)))
  sync = _sync_by_enclosing_op(events, set(source), steps)
  kinds, groups = collections.Counter(), collections.Counter()
  for name, ms in per_op.items():
    kind = name.split(".")[0]
    kinds["GEMM" if kind.startswith(("ynn_fusion", "dot")) else kind] += ms
    groups[(kind, *source.get(name, ("", "")))] += ms
  lines = [f"{model}: {sum(per_op.values()):.1f} ms of ops per step (profiled, {steps} steps)", "",
           "| op kind | ms/step |", "|---|---:|"]
  lines += [f"| {k} | {v:.2f} |" for k, v in kinds.most_common(12)]
  lines += ["", "| ms/step | op | output | source |", "|---:|---|---|---|"]
  lines += [f"| {v:.2f} | {k} | {shape} | {src[-70:]} |" for (k, shape, src), v in groups.most_common(top)]
  lines += ["", "| ms/step | synchronisation event | innermost enclosing HLO op on its thread |", "|---:|---|---|"]
  lines += [f"| {v:.2f} | {event} | {op} |" for (event, op), v in sync.most_common()]
  return "\n".join(lines)


def _sync_by_enclosing_op(events, hlo_ops: set, steps: int) -> collections.Counter:
  """ms per step of the `Rendezvous` and `Wait: ...` events by the innermost HLO op enclosing each
  on the same thread: inside a collective (e.g. `all-reduce`) they are a device waiting for the
  others to reach it, i.e. load imbalance between the devices, not an intra-op thread-pool stall."""
  threads = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "X" and "dur" in e:
      threads[(e.get("pid"), e.get("tid"))].append(e)
  out = collections.Counter()
  for es in threads.values():
    open_ = []   # events enclosing the current one, outermost first
    for e in sorted(es, key=lambda e: (e["ts"], -e["dur"])):
      while open_ and open_[-1]["ts"] + open_[-1]["dur"] <= e["ts"]:
        open_.pop()
      if e["name"] == "Rendezvous" or e["name"].startswith("Wait:"):
        op = next((f["name"] for f in reversed(open_) if f["name"] in hlo_ops), None)
        out[(e["name"], op.split(".")[0] if op else "(none)")] += e["dur"] / 1e3 / steps
      open_.append(e)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="small_tf", choices=("small_tf", "gpt2"))
  p.add_argument("--steps", type=int, default=10, help="train steps in the profiled chunk")
  p.add_argument("--top", type=int, default=30, help="rows of the per-op table")
  p.add_argument("--batch", type=int, default=64, help="instances per step (all devices together)")
  p.add_argument("--n", type=int, default=10, help="demonstrations per prompt (the paper's N = 10)")
  p.add_argument("--cpu-devices", type=int, default=1,
                 help="split the host into this many JAX devices, batch data parallel over them "
                      "(op times then sum over the devices)")
  args = p.parse_args(argv)
  print(profile(args.model, args.steps, args.top, args.cpu_devices, args.batch, args.n))


if __name__ == "__main__":
  main()
