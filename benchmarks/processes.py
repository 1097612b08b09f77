"""Data parallelism on a CPU host: two JAX devices in one process against two processes.

  python -m benchmarks.processes               # every row (a few minutes on 2 cores)
  python -m benchmarks.processes --repeats=15

Rows (each case in fresh processes, one after the other; ms per train step over chunks of 10
Small TF steps at lr 1e-5 (`benchmarks.run.TRAIN_LR`), min and median over --repeats chunks,
and CPU-ms per step from `resource.getrusage`):
  - one process, 2 CPU devices, batch 64 (experiments.main's default on 2 cores);
  - one process, 1 device, batch 32, pinned to core 0: half the work on one core, what each
    device would cost with nothing shared;
  - two processes (`jax.distributed`, gloo collectives), 1 device each, batch 64 in all.
Then the gradient all-reduce alone: a psum of Small TF's flat gradient buffer (426,218 float32)
over 2 devices in one process and across 2 processes (ms per call over 20 calls).
BUILD_NOTES (Benchmarks, eighth session) has the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time

BUFFER = 426_218   # Small TF's parameters + the loss: what mean_value_and_grad all-reduces per step


def _start(devices: int, process_id: int | None, port: str | None):
  import jax
  from l2o_jax import distributed
  distributed.set_cpu_devices(devices)
  if process_id is not None:
    distributed.initialize(True, coordinator_address=f"localhost:{port}", num_processes=2,
                           process_id=process_id)
  return jax


def _train(args) -> dict:
  jax = _start(args.devices, args.process_id, args.port)
  from benchmarks.run import TRAIN_LR, OurTrainer
  from l2o_jax.transformer import make_objective
  trainer = OurTrainer(make_objective("small_tf", batch=args.batch), 10, lr=TRAIN_LR["small_tf"],
                       devices=jax.devices())
  r0 = resource.getrusage(resource.RUSAGE_SELF)
  times = sorted(1e3 * trainer() for _ in range(args.repeats))
  r1 = resource.getrusage(resource.RUSAGE_SELF)
  cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
  return {"min": times[0], "median": times[len(times) // 2], "cpu_ms": 1e3 * cpu / args.repeats / 10,
          "loss": trainer.loss}


def _psum(args) -> dict:
  jax = _start(args.devices, args.process_id, args.port)
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from l2o_jax import distributed
  mesh = distributed.data_mesh()
  x = jax.make_array_from_callback((2 * BUFFER,), NamedSharding(mesh, P("data")),
                                   lambda index: np.ones(BUFFER, np.float32))
  f = jax.jit(jax.shard_map(lambda v: jax.lax.psum(v, "data"), mesh=mesh, in_specs=P("data"),
                            out_specs=P("data")))

  def twenty(v):
    for _ in range(20):
      v = f(v)
    return jax.block_until_ready(v)

  twenty(x)
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    twenty(x)
    times.append(1e3 * (time.perf_counter() - t0) / 20)
  times.sort()
  return {"min": times[0], "median": times[len(times) // 2]}


def _spawn(role: str, repeats: int, *, devices: int, batch: int = 64, pin: int | None = None,
           processes: int = 1) -> dict:
  """Runs `role` in `processes` fresh processes (a coordinator on a free port when 2) and
  returns process 0's result."""
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    port = str(sock.getsockname()[1])
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  procs = []
  for i in range(processes):
    cmd = [sys.executable, "-m", "benchmarks.processes", f"--role={role}", f"--repeats={repeats}",
           f"--devices={devices}", f"--batch={batch}"]
    if processes > 1:
      cmd += [f"--process-id={i}", f"--port={port}"]
    if pin is not None:
      cmd = ["taskset", "-c", str(pin)] + cmd
    procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    if p.returncode:
      raise RuntimeError(f"{role} failed:\n{err[-3000:]}")
  return json.loads([line for line in outs[0][0].splitlines() if line.startswith("{")][-1])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--repeats", type=int, default=15, help="timed chunks (train) or timings (psum)")
  p.add_argument("--role", default=None, choices=("train", "psum"), help=argparse.SUPPRESS)
  p.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
  p.add_argument("--batch", type=int, default=64, help=argparse.SUPPRESS)
  p.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
  p.add_argument("--port", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.role:    # a worker
    print(json.dumps((_train if args.role == "train" else _psum)(args)), flush=True)
    return
  rows = [("Small TF train step: 1 process, 2 devices, batch 64", _spawn("train", args.repeats, devices=2)),
          ("Small TF train step: 1 process, 1 device, batch 32, core 0 only",
           _spawn("train", args.repeats, devices=1, batch=32, pin=0)),
          ("Small TF train step: 2 processes (gloo), 1 device each, batch 64",
           _spawn("train", args.repeats, devices=1, processes=2)),
          (f"psum of {BUFFER:,} float32: 1 process, 2 devices", _spawn("psum", args.repeats, devices=2)),
          (f"psum of {BUFFER:,} float32: 2 processes (gloo)", _spawn("psum", args.repeats, devices=1, processes=2))]
  print(f"repeats {args.repeats}\n\n| case | min ms | median ms | CPU-ms per step |\n|---|---:|---:|---:|")
  for name, r in rows:
    cpu = f"{r['cpu_ms']:.1f}" if "cpu_ms" in r else ""
    print(f"| {name} | {r['min']:.2f} | {r['median']:.2f} | {cpu} |")


if __name__ == "__main__":
  main()
