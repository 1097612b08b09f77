"""How far a reported mean error moves between test sets: finished jobs on fresh test sets.

  python -m experiments.spread --workdir=DIR [--jobs=lista_vm_ss-support10] [--sets=16] [--tasks=4096]
                               [--below=0.07] [--tails [--worst=5]]

Section 6's per-task errors are heavy-tailed: a few tasks in a thousand can carry nearly all of a
test set's mean (for the trained LISTA-VM(-SS), tasks whose X has an unusually large
lambda_max(X^T X), on which the learned fixed-step iteration of eq. (4.4) diverges; BUILD_NOTES),
so one test set of 4096 tasks pins the mean down much less well than its median. For every
finished job of DIR (results.json present, or those named in --jobs) this restores the final
checkpoint, evaluates it on `--sets` independent test sets of `--tasks` tasks (eval seed, salts
100, 101, ...: disjoint from the run's own test sets, salts 1-4) and runs ISTA / FISTA
(K = eval.iters) and the converged LASSO on the same sets. It prints, per method: the mean error of each set summarised as
min / median / max over the sets, the pooled mean and median over all sets' tasks, and the
bootstrap 95% interval (`l2o_jax.metrics.mean_interval`) of the first set's mean, to compare the
interval one set reports with the spread of the sets; `--below=v` also counts the sets whose mean
is at most v (e.g. a paper's number) and gives the quartiles of the set means. For each trained job
it also gives the per-set differences of its mean against every other method on the same sets
(`paired_table`), which separate two methods better than the set-mean ranges. `--tails` shows,
per trained job over all sets' tasks, where its mean comes from (`tail_summary`): the share of
the error sum carried by its largest tasks, and its error by lambda_max(X^T X) quantile against
the LASSO's on the same tasks (large for ill-posed tasks, small for tasks the method alone
fails), and lists its `--worst` largest tasks. `--with=OTHER` (repeatable) adds the jobs of another run whose spread.json was scored on the
same test sets (same eval seed, problem, salts and set size; checked, and its ISTA / FISTA / LASSO
set means must equal this run's) to the tables, so jobs trained in separate workdirs (e.g. one
read-out per launch) are compared set by set (`merge`). Writes DIR/spread.json, which
`experiments.report DIR` then shows as tables. CPU
minutes for the LISTA family; a 12-layer Transformer takes longer (one forward pass per task).
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

from experiments import trained

SALT0 = 100   # test-set salts SALT0, SALT0 + 1, ...; the run's own sets use 1-4 (runner.test_tasks)


def _errors_fn(c, job, params_i):
  """task -> (B,) per-task squared query errors of a trained job (seed slice `params_i`)."""
  import jax
  predict, estimate = trained.model(c, job, params_i)
  if estimate is not None:
    return _beta_errors_fn(estimate)
  # lax.map in chunks of 64 prompts (vmapped inside): bounded memory for 12-layer models.
  pred = jax.jit(lambda X, y, xq: jax.lax.map(lambda a: predict(*a), (X, y, xq), batch_size=64))
  return lambda t: np.asarray((t.y_query - pred(t.X, t.y, t.x_query)) ** 2)


def _beta_errors_fn(solver):
  """task -> (B,) per-task squared query errors of a single-instance (X, y) -> beta estimator."""
  import jax
  from l2o_jax.metrics import prediction_errors
  est = jax.jit(jax.vmap(solver))
  return lambda t: np.asarray(prediction_errors(t.y_query, t.x_query, est(t.X, t.y)))


def _reference_fns(c):
  from experiments import runner
  return {name.upper(): _beta_errors_fn(solver) for name, solver in runner.reference_solvers(c).items()}


REFERENCE_RTOL = 1e-4   # the same solver on the same tasks; only float rounding may differ


def merge(out: dict, other: dict) -> dict:
  """`out` with the trained jobs of `other` (another run's spread.json, scored on the same test
  sets) added, labelled "<job> [<other's workdir name>]" (its "workdir" recorded per method), so
  that `table` and `paired_table` compare them set by set. The sets must match: equal
  `runner.test_set_signature`, salts and set size, and every reference (ISTA / FISTA / LASSO, same support)
  present in both must have the same set means to REFERENCE_RTOL, which catches any difference the
  signature misses. Raises ValueError naming what differs."""
  name = os.path.basename(os.path.normpath(other.get("workdir", "other")))
  for key in ("test_sets", "salts"):
    if out.get(key) != other.get(key):
      raise ValueError(f"with: {name} was scored on other test sets ({key} {other.get(key)} vs "
                       f"{out.get(key)} here); rerun experiments.spread there with the same --sets")
  sizes = {r["tasks_per_set"] for r in (*out["methods"].values(), *other["methods"].values())}
  if len(sizes) > 1:
    raise ValueError(f"with: {name} was scored on sets of another size ({sorted(sizes)} tasks); "
                     "use the same --tasks")
  merged = {**out, "methods": dict(out["methods"]), "with": [*out.get("with", []), other.get("workdir")]}
  for label, r in other["methods"].items():
    if r.get("workdir"):
      continue   # merged into `other` from a third run: name that run in its own --with
    if not r.get("trained"):
      if label in out["methods"]:
        a, b = np.asarray(out["methods"][label]["set_means"]), np.asarray(r["set_means"])
        if not np.allclose(a, b, rtol=REFERENCE_RTOL, atol=0):
          raise ValueError(f"with: {name}'s {label} set means {b.tolist()} differ from this run's "
                           f"{a.tolist()}: not the same test sets")
      continue   # the same sets' references: this run's already stand for them
    if f"{label} [{name}]" in merged["methods"]:
      raise ValueError(f"with: {label} [{name}] is already in the tables (two runs whose folders "
                       f"are both named {name}?)")
    merged["methods"][f"{label} [{name}]"] = {**r, "workdir": other.get("workdir")}
  return merged


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


def conditioning(X, support=None) -> tuple[np.ndarray, np.ndarray]:
  """Per task of X (B, n, d): the largest eigenvalue of X^T X and the smallest singular value of X,
  with X's columns outside `support` zeroed first when it is given (the system LISTA-VM-SS
  iterates on). lambda_max sets how far a fixed-step iteration such as eq. (4.4) can go before it
  diverges; sigma_min how ill-posed the instance is (min(n, d) singular values, so the
  restricted 10 x 10 system of Figure 1b has its own)."""
  from l2o_jax.tasks import support_mask
  X = np.asarray(X, np.float64)
  if support is not None:
    keep = np.asarray(support_mask(support, X.shape[-1]), bool)
    X = X[..., keep]
  sv = np.linalg.svd(X, compute_uv=False)
  return sv[:, 0] ** 2, sv[:, -1]


TAIL_QUANTILES = (0.0, 0.5, 0.9, 0.99, 0.999, 1.0)
TOP = (1, 10, 100)


def tail_summary(errors, lam_max, sigma_min, reference=None, *, worst: int = 5) -> dict:
  """Where a method's mean error comes from, over tasks with per-task `errors` and the
  `conditioning` of their X: the share of the error sum carried by its largest 1, 10, 100 and
  1% of tasks (and the mean without them), and the tasks binned by lambda_max quantile
  (TAIL_QUANTILES) with the method's mean error, its share of the error sum and, given
  `reference` (per-task errors of e.g. the converged LASSO on the same tasks), the reference's
  mean there: a bin where the reference is small but the method is not holds well-posed tasks the
  method fails on. NaN errors count as +inf (as in `metrics.mean_interval`); with an infinite
  error the shares are NaN (an infinite sum has no finite split)."""
  e = np.asarray(errors, np.float64)
  e = np.where(np.isnan(e), np.inf, e)
  lam, smin = np.asarray(lam_max, np.float64), np.asarray(sigma_min, np.float64)
  ref = None if reference is None else np.asarray(reference, np.float64)
  if not (e.ndim == 1 and lam.shape == e.shape == smin.shape and (ref is None or ref.shape == e.shape)):
    raise ValueError(f"errors, lam_max, sigma_min, reference: expected equal 1-d shapes, got "
                     f"{e.shape}, {lam.shape}, {smin.shape}, {None if ref is None else ref.shape}")
  total = e.sum()
  share = lambda part: float(part / total) if np.isfinite(total) and total > 0 else (
      0.0 if total == 0 else float("nan"))
  order = np.argsort(-e, kind="stable")
  top = {}
  for k in (*TOP, max(1, e.size // 100)):
    k = min(k, e.size)
    rest = e[order[k:]]
    top[str(k)] = {"share": share(e[order[:k]].sum()),
                   "mean_without": float(rest.mean()) if rest.size else float("nan")}
  # Bins by rank, so ties and the top edge fall in exactly one bin.
  ranks = np.empty(e.size, np.int64)
  ranks[np.argsort(lam, kind="stable")] = np.arange(e.size)
  cuts = [int(round(q * e.size)) for q in TAIL_QUANTILES]
  bins = []
  for i, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:])):
    m = (ranks >= lo) & (ranks < hi)
    if not m.any():
      continue
    bins.append({"quantiles": [TAIL_QUANTILES[i], TAIL_QUANTILES[i + 1]],
                 "lam_max": [float(lam[m].min()), float(lam[m].max())], "tasks": int(m.sum()),
                 "mean": float(e[m].mean()), "share": share(e[m].sum()),
                 "reference_mean": None if ref is None else float(ref[m].mean())})
  worst_tasks = [{"error": float(e[i]), "lam_max": float(lam[i]), "sigma_min": float(smin[i]),
                  "reference": None if ref is None else float(ref[i]),
                  "lam_max_quantile": float(ranks[i] / e.size)} for i in order[:worst]]
  return {"tasks": int(e.size), "mean": float(e.mean()), "median": float(np.median(e)), "top": top,
          "bins": bins, "worst": worst_tasks}


def spread(workdir: str, *, jobs=None, sets: int = 16, tasks: int | None = None,
           references: bool = True, tails: bool = False, worst: int = 5, log=print) -> dict:
  """See the module docstring. tails=True also gives, for each trained job, `tail_summary` over
  all sets' tasks (its `worst` largest listed; the converged LASSO as the reference when
  references are on) in out["tails"]."""
  from experiments import runner
  c = trained.load_config(workdir)
  tasks = c.eval.num_tasks if tasks is None else tasks
  if jobs is None:
    jobs = [j.name for j in runner.plan_jobs(c) if os.path.exists(os.path.join(workdir, j.name, "results.json"))]
  planned = {n: trained.planned_job(c, n) for n in jobs}
  if not jobs:
    raise ValueError(f"workdir: {workdir} has no finished job (no <job>/results.json)")
  out = {"workdir": workdir, "salts": [SALT0 + i for i in range(sets)],
         "test_sets": runner.test_set_signature(c), "methods": {}}
  if tails:
    out["tails"] = {}
  per_task = {}
  with runner.matmul_precision(c):
    for name in jobs:
      job = planned[name]
      test_sets = [runner.test_tasks(c, tasks, support=job.support, salt=SALT0 + i) for i in range(sets)]
      fns = {}
      params = trained.trained_params(c, job, workdir)
      for i in range(c.seeds):
        fns[name + (f" (seed {c.seed + i})" if c.seeds > 1 else "")] = _errors_fn(
            c, job, runner._seed_params(params, i))
      trained_labels = list(fns)
      suffix = f" (support {job.support})" if job.support else ""
      if references:
        fns.update({k + suffix: f for k, f in _reference_fns(c).items()
                    if k + suffix not in out["methods"]})
      for label, fn in fns.items():
        errors = [fn(t) for t in test_sets]
        # The support prior picks a job's test sets (runner.test_tasks); kept so that
        # `paired_table` only subtracts set means of the same tasks.
        out["methods"][label] = {**summarise(errors), "trained": label in trained_labels,
                                 "support": job.support}
        if tails:
          per_task[label] = np.concatenate(errors)
        log(f"{label}: done")
      if tails:
        # The system the method iterates on: LISTA-VM-SS zeroes X outside the support.
        lam, smin = map(np.concatenate, zip(*(conditioning(t.X, job.prior_support) for t in test_sets)))
        for label in trained_labels:
          out["tails"][label] = tail_summary(per_task[label], lam, smin, per_task.get("LASSO" + suffix),
                                             worst=worst)
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


def paired_table(out: dict) -> str:
  """Markdown: for each trained job A and each other method B scored on the same test sets, the
  per-set difference of the means, mean_A - mean_B, as min / median / max over the sets, and in
  how many sets A is the lower. The sets' own spread is shared by every method on them (hard sets
  are hard for all), so the paired differences separate two methods far better than their set-mean
  ranges in `table` do. "" for a spread.json written before these fields existed."""
  ms = out["methods"]
  trained_labels = [label for label, r in ms.items() if r.get("trained")]
  rows = []
  for i, a in enumerate(trained_labels):
    for b, rb in ms.items():
      if b == a or b in trained_labels[:i] or rb.get("support") != ms[a].get("support"):
        continue
      diff = np.asarray(ms[a]["set_means"]) - np.asarray(rb["set_means"])
      rows.append(f"| {a} − {b} | {diff.min():.4g} / {np.median(diff):.4g} / {diff.max():.4g} "
                  f"| {int((diff < 0).sum())} of {diff.size} |")
  if not rows:
    return ""
  return "\n".join(["| A − B (same test sets) | per-set mean difference min / median / max | sets where A is lower |",
                    "|---|---|---:|", *rows])


def tails_table(out: dict) -> str:
  """Markdown for out["tails"] (`spread(..., tails=True)`): per trained job, how much of the error
  sum its largest tasks carry, and the error by lambda_max(X^T X) quantile."""
  lines = []
  for label, t in out.get("tails", {}).items():
    tops = " / ".join(f"{k}: {v['share']:.3f} ({v['mean_without']:.4g})" for k, v in t["top"].items())
    lines += [f"**{label}** ({t['tasks']} tasks, mean {t['mean']:.4g}, median {t['median']:.4g}). "
              f"Share of the error sum carried by its largest k tasks (mean without them): {tops}.", "",
              "| lambda_max(XᵀX) quantiles | lambda_max | tasks | mean error | share of error sum | LASSO mean |",
              "|---|---|---:|---:|---:|---:|"]
    for b in t["bins"]:
      ref = "" if b["reference_mean"] is None else f"{b['reference_mean']:.4g}"
      lines.append(f"| {b['quantiles'][0]:g}–{b['quantiles'][1]:g} | {b['lam_max'][0]:.1f}–{b['lam_max'][1]:.1f} "
                   f"| {b['tasks']} | {b['mean']:.4g} | {b['share']:.3f} | {ref} |")
    worst = "; ".join(f"{w['error']:.3g} (lambda_max {w['lam_max']:.1f}, sigma_min {w['sigma_min']:.3f}"
                      + ("" if w["reference"] is None else f", LASSO {w['reference']:.3g}") + ")"
                      for w in t["worst"])
    lines += ["", f"Largest errors: {worst}.", ""]
  return "\n".join(lines).rstrip()


def _load_spread(workdir: str) -> dict:
  """workdir's spread.json; one written before `test_sets` existed gets it from its config."""
  path = os.path.join(workdir, "spread.json")
  if not os.path.exists(path):
    raise ValueError(f"with: {workdir} has no spread.json (run experiments.spread --workdir={workdir} first)")
  other = json.load(open(path))
  from experiments import runner
  other.setdefault("test_sets", runner.test_set_signature(trained.load_config(workdir)))
  return other


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--jobs", default="", help="comma-separated job names (default: every finished job)")
  p.add_argument("--sets", type=int, default=16)
  p.add_argument("--tasks", type=int, default=0, help="tasks per set (default: the run's eval.num_tasks)")
  p.add_argument("--no-references", action="store_true", help="skip ISTA / FISTA / LASSO")
  p.add_argument("--below", type=float, default=None,
                 help="also count the sets whose mean is at most this value (e.g. a paper's number)")
  p.add_argument("--tails", action="store_true",
                 help="also show where each trained job's mean comes from: its largest tasks and its "
                      "error by lambda_max(X^T X) quantile, against the LASSO on the same tasks")
  p.add_argument("--worst", type=int, default=5, help="with --tails: how many of the largest tasks to list")
  p.add_argument("--with", dest="others", action="append", default=[], metavar="OTHER",
                 help="another run's workdir whose spread.json holds the same test sets: its trained "
                      "jobs join the tables (repeatable)")
  args = p.parse_args(argv)
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.ERROR)   # orbax's per-restore metadata warnings
  if args.sets < 1:
    p.error(f"--sets: expected an integer >= 1, got {args.sets}")
  if args.worst < 1:
    p.error(f"--worst: expected an integer >= 1, got {args.worst}")
  if args.tasks < 0:
    p.error(f"--tasks: expected an integer >= 1 (or 0 for the run's), got {args.tasks}")
  try:
    others = [_load_spread(o) for o in args.others]   # before the minutes of scoring
    out = spread(args.workdir, jobs=[j for j in args.jobs.split(",") if j] or None, sets=args.sets,
                 tasks=args.tasks or None, references=not args.no_references, tails=args.tails,
                 worst=args.worst)
    for other in others:
      out = merge(out, other)
  except ValueError as e:
    p.error(str(e))
  out["below"] = args.below
  with open(os.path.join(args.workdir, "spread.json"), "w") as f:
    json.dump(out, f, indent=1)
  print(table(out, args.below))
  paired = paired_table(out)
  if paired:
    print("\n" + paired)
  if args.tails:
    print("\n" + tails_table(out))


if __name__ == "__main__":
  main()
