"""How far a reported mean error moves between test sets: finished jobs on fresh test sets.

  python -m experiments.spread --workdir=DIR [--jobs=lista_vm_ss-support10] [--sets=16] [--tasks=4096]
                               [--below=0.07]

Section 6's per-task errors are heavy-tailed: with N = 10 < d = 20 (and, in Figure 1b, a
10 x 10 restricted system) a few ill-conditioned X's dominate a test set's mean, so one test set
of 4096 tasks pins the mean down much less well than its median. For every finished job of DIR
(results.json present, or those named in --jobs) this restores the final checkpoint, evaluates
it on `--sets` independent test sets of `--tasks` tasks (eval seed, salts 100, 101, ...: disjoint
from the run's own test sets, salts 1-4) and runs ISTA / FISTA (K = eval.iters) and the converged
LASSO on the same sets. It prints, per method: the mean error of each set summarised as
min / median / max over the sets, the pooled mean and median over all sets' tasks, and the
bootstrap 95% interval (`l2o_jax.metrics.mean_interval`) of the first set's mean, to compare the
interval one set reports with the spread of the sets; `--below=v` also counts the sets whose mean
is at most v (e.g. a paper's number) and gives the quartiles of the set means. Writes
DIR/spread.json, which `experiments.report DIR` then shows as a table. CPU minutes for
the LISTA family; a 12-layer Transformer takes longer (one forward pass per task).
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

SALT0 = 100   # test-set salts SALT0, SALT0 + 1, ...; the run's own sets use 1-4 (runner.test_tasks)


def load_config(workdir: str):
  """The run's resolved config (config.json) over the current defaults, so fields added since
  the run keep their defaults."""
  from experiments.configs.base import base
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"workdir: {workdir} has no config.json (not a run directory)")
  c = base()

  def merge(cfg, values):
    for k, v in values.items():
      if isinstance(v, dict) and k in cfg:
        merge(cfg[k], v)
      elif k in cfg:
        cfg[k] = v
  merge(c, json.load(open(path)))
  return c


def trained_params(c, job, workdir: str):
  """Parameters (leading seed axis) of a finished job's final checkpoint."""
  from experiments import runner
  from l2o_jax import checkpoint as ckpt_lib
  from l2o_jax import train
  objective, optimizer, steps, *_ = runner.make_objective(c, job)
  like = train.init_states(objective, optimizer, [c.seed + i for i in range(c.seeds)])
  if steps == 0:      # e.g. layers.steps = 0: the untrained start is what the run scored
    return like.params
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, job.name, "checkpoints"))
  try:
    restored = ckpt.restore_latest(like)
  finally:
    ckpt.close()
  if restored is None:
    raise ValueError(f"jobs: {job.name} has no checkpoint in {workdir}")
  state, step = restored
  if step != steps:
    raise ValueError(f"jobs: {job.name}'s latest checkpoint is step {step}, not its final {steps} "
                     "(unfinished: relaunch experiments.main first)")
  return state.params


def _errors_fn(c, job, params_i):
  """task -> (B,) per-task squared query errors of a trained job (seed slice `params_i`)."""
  import jax
  from experiments import runner
  from l2o_jax import lista
  if job.family == "tf":
    from l2o_jax import transformer
    clip = runner.score_clip(c, job)
    one = lambda a: transformer.predict(job.method, params_i, *a, score_clip=clip)[-1]
    # lax.map in chunks of 64 prompts (vmapped inside): bounded memory for 12-layer models.
    pred = jax.jit(lambda X, y, xq: jax.lax.map(one, (X, y, xq), batch_size=64))
    return lambda t: np.asarray((t.y_query - pred(t.X, t.y, t.x_query)) ** 2)
  support = job.support if job.lista_method == "lista_vm_ss" else None
  return _beta_errors_fn(lambda X, y: lista.apply(job.lista_method, params_i, X, y, support=support))


def _beta_errors_fn(solver):
  """task -> (B,) per-task squared query errors of a single-instance (X, y) -> beta estimator."""
  import jax
  from l2o_jax.metrics import prediction_errors
  est = jax.jit(jax.vmap(solver))
  return lambda t: np.asarray(prediction_errors(t.y_query, t.x_query, est(t.X, t.y)))


def _reference_fns(c):
  from experiments import runner
  return {name.upper(): _beta_errors_fn(solver) for name, solver in runner.reference_solvers(c).items()}


def summarise(per_set: list[np.ndarray]) -> dict:
  """Per-set means (min / median / max), pooled mean and median, first set's bootstrap interval."""
  from l2o_jax.metrics import mean_interval, median_error
  means = np.array([e.mean() for e in per_set])
  pooled = np.concatenate(per_set)
  return {"set_means": means.tolist(), "set_mean_min": float(means.min()),
          "set_mean_median": float(np.median(means)), "set_mean_max": float(means.max()),
          "pooled_mean": float(pooled.mean()), "pooled_median": float(median_error(pooled)),
          "first_set_mean": float(means[0]), "first_set_ci95": list(mean_interval(per_set[0])),
          "tasks_per_set": int(per_set[0].size), "sets": len(per_set)}


def spread(workdir: str, *, jobs=None, sets: int = 16, tasks: int | None = None,
           references: bool = True, log=print) -> dict:
  from experiments import runner
  c = load_config(workdir)
  tasks = c.eval.num_tasks if tasks is None else tasks
  planned = {j.name: j for j in runner.plan_jobs(c)}
  if jobs is None:
    jobs = [n for n in planned if os.path.exists(os.path.join(workdir, n, "results.json"))]
  for n in jobs:
    if n not in planned:
      raise ValueError(f"jobs: {n!r} is not a job of this run; its jobs are {sorted(planned)}")
  if not jobs:
    raise ValueError(f"workdir: {workdir} has no finished job (no <job>/results.json)")
  out = {"workdir": workdir, "salts": [SALT0 + i for i in range(sets)], "methods": {}}
  with runner.matmul_precision(c):
    for name in jobs:
      job = planned[name]
      test_sets = [runner.test_tasks(c, tasks, support=job.support, salt=SALT0 + i) for i in range(sets)]
      fns = {}
      params = trained_params(c, job, workdir)
      for i in range(c.seeds):
        fns[name + (f" (seed {c.seed + i})" if c.seeds > 1 else "")] = _errors_fn(
            c, job, runner._seed_params(params, i))
      if references:
        suffix = f" (support {job.support})" if job.support else ""
        fns.update({k + suffix: f for k, f in _reference_fns(c).items()
                    if k + suffix not in out["methods"]})
      for label, fn in fns.items():
        out["methods"][label] = summarise([fn(t) for t in test_sets])
        log(f"{label}: done")
  return out


def table(out: dict, below: float | None = None) -> str:
  s = next(iter(out["methods"].values()))
  lines = [f"{s['sets']} test sets x {s['tasks_per_set']} tasks (salts {out['salts'][0]}-{out['salts'][-1]})",
           "", "| method | set means min / median / max | pooled mean | pooled median | set 1 mean [bootstrap 95%] |",
           "|---|---|---:|---:|---|"]
  for label, r in out["methods"].items():
    lo, hi = r["first_set_ci95"]
    lines.append(f"| {label} | {r['set_mean_min']:.4g} / {r['set_mean_median']:.4g} / {r['set_mean_max']:.4g} "
                 f"| {r['pooled_mean']:.4g} | {r['pooled_median']:.4g} | {r['first_set_mean']:.4g} [{lo:.4g}, {hi:.4g}] |")
  if below is not None:
    lines += ["", f"| method | sets with mean <= {below:g} | set means p25 / p50 / p75 |", "|---|---:|---|"]
    for label, r in out["methods"].items():
      m = np.asarray(r["set_means"])
      q = np.percentile(m, [25, 50, 75])
      lines.append(f"| {label} | {int((m <= below).sum())} of {m.size} | {q[0]:.4g} / {q[1]:.4g} / {q[2]:.4g} |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--jobs", default="", help="comma-separated job names (default: every finished job)")
  p.add_argument("--sets", type=int, default=16)
  p.add_argument("--tasks", type=int, default=0, help="tasks per set (default: the run's eval.num_tasks)")
  p.add_argument("--no-references", action="store_true", help="skip ISTA / FISTA / LASSO")
  p.add_argument("--below", type=float, default=None,
                 help="also count the sets whose mean is at most this value (e.g. a paper's number)")
  args = p.parse_args(argv)
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.ERROR)   # orbax's per-restore metadata warnings
  if args.sets < 1:
    p.error(f"--sets: expected an integer >= 1, got {args.sets}")
  if args.tasks < 0:
    p.error(f"--tasks: expected an integer >= 1 (or 0 for the run's), got {args.tasks}")
  try:
    out = spread(args.workdir, jobs=[j for j in args.jobs.split(",") if j] or None, sets=args.sets,
                 tasks=args.tasks or None, references=not args.no_references)
  except ValueError as e:
    p.error(str(e))
  out["below"] = args.below
  with open(os.path.join(args.workdir, "spread.json"), "w") as f:
    json.dump(out, f, indent=1)
  print(table(out, args.below))


if __name__ == "__main__":
  main()
