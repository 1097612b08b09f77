"""Figures and tables from finished runs: python -m experiments.report WORKDIR [WORKDIR ...] [--out DIR]

Reads each WORKDIR's config.json and per-job results.json (so a partly finished run still
reports what it has), and writes into DIR (default: the first WORKDIR's report/):
  fig1a.png, fig1b.png     prediction error per method (bars, log scale), converged LASSO and
                           exhaustive-support oracle as reference lines (section 6, Figure 1a/b)
  fig1c.png                Small TF read-outs vs prompt length n (Figure 1c)
  fig2.png, fig3.png       test prediction error vs epoch of meta-trained LISTA(-CP) / LISTA-VM
  layers.png               error vs depth K: constructed Transformer, LISTA-VM, ISTA, FISTA
  prompt_length.png        error vs prompt length n (n = eval.prompt_lengths, also beyond the training
                           N: dashed line) in Figure 1a's setting: curves for the models that accept
                           any n and the references, marks at n = N for LISTA / LISTA-CP / ALISTA
  prompt_length_supportS.png  the same in Figure 1b's setting (support prior in the first S entries)
  transformer_training.png test error vs training step of the trained Small TF / GPT-2 jobs (their
                           evaluations every tf_train.eval_every steps on the curve tasks)
  results.md               every number above as markdown tables
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from experiments.runner import FIXED_X, Job, _ints, _split, widen  # noqa: E402
from experiments.writers import read_jsonl  # noqa: E402

LABELS = {"lista": "LISTA", "lista_cp": "LISTA-CP", "alista": "ALISTA", "lista_meta": "LISTA (meta)",
          "lista_cp_meta": "LISTA-CP (meta)", "lista_vm": "LISTA-VM", "lista_vm_ss": "LISTA-VM-SS",
          "small_tf": "Small TF", "gpt2": "GPT-2", "ista": "ISTA", "fista": "FISTA",
          "lasso": "LASSO (converged)", "oracle": "oracle"}
READOUT_LABELS = {"linear": "Linear Readout", "query": "Query Readout", "query_dagger": "Query Readout†"}


def load(workdir: str) -> dict:
  """{"config", "jobs": {name: results}, "references": {...}, "classical_table"?} of one run."""
  cfg_path = os.path.join(workdir, "config.json")
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f"WORKDIR: {workdir} has no config.json (not a run directory)")
  cfg = json.load(open(cfg_path))
  summary = os.path.join(workdir, "results.json")
  s = json.load(open(summary)) if os.path.exists(summary) else {}
  widen(cfg, s)   # studies and jobs of earlier launches into this workdir (results.json keeps them)
  run = {"config": cfg, "jobs": {}, "references": s.get("references", {}), "workdir": workdir,
         "unfinished": {}, "studies": _split(cfg["studies"])}
  if s:
    run["classical_table"] = s.get("classical_table")
  for name in sorted(os.listdir(workdir)):
    path = os.path.join(workdir, name, "results.json")
    if os.path.exists(path):
      run["jobs"][name] = json.load(open(path))
    elif os.path.isdir(os.path.join(workdir, name, "checkpoints")):
      metrics = os.path.join(workdir, name, "metrics.jsonl")
      records = read_jsonl(metrics) if os.path.exists(metrics) else []
      run["unfinished"][name] = records[-1] if records else {}
  return run


def unfinished_table(run) -> list[str]:
  """Jobs that started but have no results (stopped, interrupted or still running)."""
  if not run["unfinished"]:
    return []
  md = ["### Unfinished jobs", "",
        "Started but without results: interrupted, stopped on a non-finite loss, or still running. "
        "Relaunching the same command resumes them from their last checkpoint.", "",
        "| job | last logged step | train loss | test prediction error |", "|---|---:|---:|---:|"]
  for name, last in run["unfinished"].items():
    cells = [last.get("step"), last.get("train_loss"), last.get("test_pred_error")]
    md.append(f"| {name} | " + " | ".join("-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)
                                          for v in cells) + " |")
  return md + [""]


def _job_name(cfg, method, support=None) -> str:
  return Job(method, support=support, readout=cfg["tf"]["readout"] if method == "small_tf" else None).name


def _mean(entry) -> float:
  return entry["mean"] if isinstance(entry, dict) else float(entry)


def _fmt(entry) -> str:
  if entry is None:
    return ""
  if isinstance(entry, dict) and len(entry.get("per_seed", [])) > 1:
    return f"{entry['mean']:.4g} ± {entry['std']:.2g}"
  return f"{_mean(entry):.4g}"


def _interval(entry) -> str:
  """[lo, hi] of a bootstrap 95% interval of the mean over test tasks (runs before it existed: "")."""
  if entry is None:
    return ""
  lo, hi = (_mean(b) for b in entry)
  return f"[{lo:.3g}, {hi:.3g}]"


def bar_figure(run, study: str, out_dir: str, support=None) -> tuple[str, list[str]] | None:
  cfg = run["config"]
  if study not in run["studies"]:
    return None
  methods = _split(cfg[study]["methods"])
  refs = run["references"].get(f"support{support}" if support else "none", {})
  names, values, errs, colors, fixed, rows = [], [], [], [], [], []
  for name, key in (("ista", "ista"), ("fista", "fista")):
    if key in refs:
      names.append(LABELS[name]); values.append(refs[key]); errs.append(0); colors.append("0.6")
      fixed.append(None)
      rows.append(f"| {LABELS[name]} (K={refs['iters']}, lam={refs['lam']}) | {refs[key]:.4g} "
                  f"| {_interval(refs.get(key + '_ci95'))} | {_fmt(refs.get(key + '_median'))} | | |")
  for m in methods:
    job = run["jobs"].get(_job_name(cfg, m, support))
    if job is None:
      continue
    names.append(LABELS.get(m, m))
    values.append(_mean(job["pred_error"]))
    errs.append(job["pred_error"].get("std", 0.0))
    colors.append("tab:red" if m.endswith("_meta") else ("tab:blue" if m in FIXED_X else "tab:green"))
    fixed.append(_mean(job["pred_error_fixed_x"]) if "pred_error_fixed_x" in job else None)
    rows.append(f"| {LABELS.get(m, m)} | {_fmt(job['pred_error'])} | {_interval(job.get('pred_error_ci95'))} "
                f"| {_fmt(job.get('pred_error_median'))} "
                f"| {_fmt(job.get('pred_error_fixed_x'))} "
                f"| {job['steps']} x {len(job['seeds'])} seed(s) |")
  if not names:
    return None
  fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names)), 4))
  x = range(len(names))
  ax.bar(x, values, yerr=errs, color=colors, capsize=3, label="test on varying X")
  fx = [(i, v) for i, v in enumerate(fixed) if v is not None]
  if fx:
    ax.scatter([i for i, _ in fx], [v for _, v in fx], marker="*", s=120, color="k", zorder=3,
               label="test on the training X (fixed)")
  if "oracle_skipped" in refs:
    rows.append(f"| {LABELS['oracle']} | left out: {refs['oracle_skipped']} | | | | |")
  for key, style in (("lasso", "--"), ("oracle", ":")):
    if key in refs:
      ax.axhline(refs[key], ls=style, color="k", lw=1, label=f"{LABELS[key]} = {refs[key]:.3g}")
      rows.append(f"| {LABELS[key]} | {refs[key]:.4g} | {_interval(refs.get(key + '_ci95'))} "
                  f"| {_fmt(refs.get(key + '_median'))} | | |")
  ax.set_xticks(list(x), names, rotation=30, ha="right")
  ax.set_yscale("log")
  ax.set_ylabel("prediction error  (y - ŷ)²")
  S = cfg["problem"]["s"]
  title = f"Figure 1a: S = {S}" if support is None else f"Figure 1b: S = {S}, support in first {support}"
  ax.set_title(f"{title}  [{cfg['name']}]")
  ax.legend(fontsize=8)
  fig.tight_layout()
  path = os.path.join(out_dir, f"{study}.png")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  table = [f"### {title}", "", "| method | prediction error (varying X) | 95% interval of the mean | "
           "median over tasks | fixed training X | training |", "|---|---:|---|---:|---:|---|", *rows, "",
           "The interval is a bootstrap over the test tasks (`l2o_jax.metrics.mean_interval`): the "
           "errors are heavy-tailed, so a few tasks can move the mean; `python -m experiments.spread` "
           "measures it on fresh test sets.", ""]
  return path, table


def _beyond_training_n(ax, N: int, ns) -> list[str]:
  """Integer ticks for the prompt-length axis; marks the training prompt length N (dashed vertical
  line) when the curves go beyond it; returns the table's note (empty when every n <= N)."""
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  if not ns or max(ns) <= N:
    return []
  ax.axvline(N, ls="--", color="0.4", lw=1, label=f"training N = {N}")
  return [f"Columns n > N = {N} lie beyond the training prompt length (right of the dashed line in the "
          "figure).", ""]


def fig1c(run, out_dir: str):
  cfg = run["config"]
  if "fig1c" not in run["studies"]:
    return None
  fig, ax = plt.subplots(figsize=(6, 4))
  rows = []
  for r in _split(cfg["fig1c"]["readouts"]):
    job = run["jobs"].get(Job("small_tf", readout=r).name)
    if job is None or "per_prompt_length" not in job:
      continue
    ppl = job["per_prompt_length"]
    ns = sorted(int(n) for n in ppl)
    ax.plot(ns, [_mean(ppl[str(n)]) for n in ns], marker="o", label=READOUT_LABELS[r])
    rows.append(f"| {READOUT_LABELS[r]} | " + " | ".join(f"{_mean(ppl[str(n)]):.3g}" for n in ns) + " |")
  if not rows:
    plt.close(fig)
    return None
  note = _beyond_training_n(ax, cfg["problem"]["n"], ns)
  ax.set_yscale("log")
  ax.set_xlabel("prompt length n")
  ax.set_ylabel("prediction error")
  ax.set_title(f"Figure 1c: Small TF read-outs  [{cfg['name']}]")
  ax.legend()
  fig.tight_layout()
  path = os.path.join(out_dir, "fig1c.png")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  table = ["### Figure 1c: Small TF read-outs vs prompt length", "", *note,
           "| read-out | " + " | ".join(f"n={n}" for n in ns) + " |", "|---|" + "---:|" * len(ns), *rows, ""]
  return path, table


def _plot_curve(ax, xs, pts, label: str) -> list[float]:
  """One job's evaluations during training: the mean over its seeds as a line and, with several
  seeds, their min-max range shaded; returns the means."""
  ys = [p["test_pred_error"] for p in pts]
  line, = ax.plot(xs, ys, label=label)
  per_seed = [p.get("test_pred_error_per_seed") or [] for p in pts]
  if all(len(v) > 1 for v in per_seed):
    ax.fill_between(xs, [min(v) for v in per_seed], [max(v) for v in per_seed], alpha=0.2,
                    color=line.get_color())
  return ys


def curves(run, study: str, out_dir: str):
  cfg = run["config"]
  if study not in run["studies"]:
    return None
  fig, ax = plt.subplots(figsize=(6, 4))
  rows = []
  for m in _split(cfg[study]["methods"]):
    job = run["jobs"].get(_job_name(cfg, m))
    if job is None or not job.get("curve"):
      continue
    pts = job["curve"]
    ys = _plot_curve(ax, [p["epoch"] if p.get("epoch") is not None else p["step"] for p in pts], pts,
                     LABELS.get(m, m))
    rows.append(f"| {LABELS.get(m, m)} | {ys[0]:.4g} | {ys[-1]:.4g} | {min(ys):.4g} | {len(pts)} |")
  if not rows:
    plt.close(fig)
    return None
  ax.set_xlabel("epoch" if pts[0].get("epoch") is not None else "step")
  ax.set_ylabel("test prediction error (varying X)")
  ax.set_yscale("log")
  name = "Figure 2: meta-trained LISTA / LISTA-CP" if study == "fig2" else "Figure 3: meta-trained LISTA-VM"
  ax.set_title(f"{name}  [{cfg['name']}]")
  ax.legend()
  fig.tight_layout()
  path = os.path.join(out_dir, f"{study}.png")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  table = [f"### {name}", "", "| method | first eval | last eval | best | evals |", "|---|---:|---:|---:|---:|",
           *rows, ""]
  return path, table


TRAINING_TABLE_ROWS = 11   # evaluations shown per Transformer training table (first and last kept)


def transformer_training(run, out_dir: str):
  """Test error vs training step of every trained Transformer job (Small TF, GPT-2).

  Each point is the job's own evaluation during training (`tf_train.eval_every`) on the run's
  `eval.curve_tasks` curve tasks: one fixed set per support prior, so jobs with the same support are
  compared on the same tasks at every step. This shows whether a shortened run was still improving
  and whether two models' order changed during training."""
  jobs = {name: j for name, j in sorted(run["jobs"].items())
          if j.get("family") == "tf" and len(j.get("curve") or []) >= 2}
  if not jobs:
    return None
  fig, ax = plt.subplots(figsize=(7, 4))
  by_step = {}
  for name, j in jobs.items():
    pts = j["curve"]
    _plot_curve(ax, [p["step"] for p in pts], pts, name)
    for p in pts:
      by_step.setdefault(p["step"], {})[name] = p["test_pred_error"]
  steps = sorted(by_step)
  if len(steps) > TRAINING_TABLE_ROWS:   # evenly spaced evaluations, the first and the last kept
    picks = {round(i * (len(steps) - 1) / (TRAINING_TABLE_ROWS - 1)) for i in range(TRAINING_TABLE_ROWS)}
    steps = [steps[i] for i in sorted(picks)]
  path = _save_log_figure(fig, ax, out_dir, "transformer_training", xlabel="training step",
                          ylabel="test prediction error (curve tasks)",
                          title=f"Transformer training  [{run['config']['name']}]")
  names = list(jobs)
  rows = ["| step | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
  for s in steps:
    rows.append(f"| {s} | " + " | ".join(f"{by_step[s][n]:.4g}" if n in by_step[s] else "" for n in names) + " |")
  curve_tasks = run["config"]["eval"]["curve_tasks"]
  table = ["### Transformer training: test error vs step", "",
           f"Each job's evaluations during training on {curve_tasks} curve tasks (the same tasks for every "
           "job with the same support prior; not the final test set; several training seeds: their mean, "
           "their range shaded in the figure)"
           + (f", {len(steps)} of {len(by_step)} evaluations shown" if len(steps) < len(by_step) else "") + ".",
           "", *rows, ""]
  return path, table


def _save_log_figure(fig, ax, out_dir: str, name: str, *, xlabel: str, ylabel: str, title: str,
                     legend_size: int = 8, legend_outside: bool = False) -> str:
  """Log-scale y axis, labels, legend (right of the axes with legend_outside); writes
  out_dir/name.png and closes the figure."""
  ax.set_yscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  if legend_outside:
    ax.legend(fontsize=legend_size, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  else:
    ax.legend(fontsize=legend_size)
  fig.tight_layout()
  path = os.path.join(out_dir, f"{name}.png")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def layers(run, out_dir: str):
  cfg = run["config"]
  if "layers" not in run["studies"]:
    return None
  ks = sorted(set(_ints("layers.ks", cfg["layers"]["ks"])))   # launches may have added depths in any order
  refs = run["references"].get("none", {})
  tf, vm, got = [], [], []
  for k in ks:
    job = run["jobs"].get(Job("lista_vm", num_layers=k).name)
    if job is not None:
      got.append(k)
      tf.append(_mean(job["constructed_tf_pred_error"]))
      vm.append(_mean(job["pred_error"]))
  if not got:
    return None
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(got, tf, marker="o", label="constructed Transformer (Thm 4.1)")
  ax.plot(got, vm, marker="x", ls="--", label="LISTA-VM")
  rows = []
  for name in ("ista", "fista"):
    per_k = refs.get(f"{name}_per_k", {})
    if per_k:
      ax.plot(got, [per_k[str(k)] for k in got], marker=".", label=f"{LABELS[name]} (lam={refs['lam']})")
  for i, k in enumerate(got):
    ista = refs.get("ista_per_k", {}).get(str(k))
    fista = refs.get("fista_per_k", {}).get(str(k))
    rows.append(f"| {k} | {tf[i]:.4g} | {vm[i]:.4g} | {'' if ista is None else f'{ista:.4g}'} | "
                f"{'' if fista is None else f'{fista:.4g}'} |")
  path = _save_log_figure(fig, ax, out_dir, "layers", xlabel="layers / iterations K", ylabel="prediction error",
                          title=f"Theorem 5.1: error vs depth  [{cfg['name']}]")
  table = ["### Error vs depth K (Theorem 5.1)", "",
           "| K | constructed TF | LISTA-VM | ISTA | FISTA |", "|---:|---:|---:|---:|---:|", *rows, ""]
  return path, table


def per_layer(run, out_dir: str):
  """Error after each unrolled layer k = 1..K for every LISTA-type job, ISTA and FISTA."""
  cfg = run["config"]
  refs = run["references"].get("none", {})
  series = []
  for name, job in sorted(run["jobs"].items()):
    if "per_layer" in job and "-K" not in name and not job.get("support"):
      series.append((LABELS.get(name, LABELS.get(job["method"], name)), [_mean(v) if isinstance(v, dict) else v
                                                                          for v in job["per_layer"]]))
  for name in ("ista", "fista"):
    if refs.get(f"{name}_per_layer"):
      series.append((f"{LABELS[name]} (lam={refs['lam']})", refs[f"{name}_per_layer"]))
  if not series:
    return None
  fig, ax = plt.subplots(figsize=(6, 4))
  K = max(len(v) for _, v in series)
  rows = []
  for label, values in series:
    ax.plot(range(1, len(values) + 1), values, marker=".", label=label)
    rows.append(f"| {label} | " + " | ".join(f"{v:.3g}" for v in values) + " |")
  path = _save_log_figure(fig, ax, out_dir, "per_layer", xlabel="layer / iteration k",
                          ylabel="prediction error (varying X)", title=f"Error after each layer  [{cfg['name']}]",
                          legend_size=7)
  table = ["### Prediction error after each layer (varying X)", "",
           "| method | " + " | ".join(f"k={k}" for k in range(1, K + 1)) + " |", "|---|" + "---:|" * K, *rows, ""]
  return path, table


FIXED_N_MARK = {"lista": "s", "lista_cp": "^", "alista": "D", "lista_meta": "s", "lista_cp_meta": "^"}


def prompt_length(run, out_dir: str, support=None):
  """Prediction error vs prompt length n (Figure 1a's setting, or Figure 1b's with `support`):
  curves for the models that take any n (Transformers, LISTA-VM(-SS), ISTA / FISTA / LASSO) and,
  at n = N only, marks for LISTA / LISTA-CP / ALISTA, whose weights are shaped for N rows (the
  meta-trained ones red, as the paper's "red marks" in Figure 1a)."""
  cfg = run["config"]
  refs = run["references"].get(f"support{support}" if support else "none", {})
  N = cfg["problem"]["n"]
  series, marks, notes = [], [], []
  for name, job in sorted(run["jobs"].items()):
    if (job.get("support") or None) != (support or None) or "-K" in name:  # depth-study jobs: layers.png
      continue
    label = LABELS.get(job["method"], job["method"])
    if "per_prompt_length" in job and (job["method"] != "small_tf" or job["readout"] == cfg["tf"]["readout"]):
      ppl = job["per_prompt_length"]
      series.append((label, {int(n): _mean(v) for n, v in ppl.items()}))
      if job.get("per_prompt_length_skipped"):  # e.g. GPT-2 beyond its learned position table
        notes.append(f"{label}: n = {', '.join(map(str, job['per_prompt_length_skipped']))} left blank; "
                     f"{job.get('per_prompt_length_note', 'the model cannot take these lengths')}.")
    elif job["method"] in FIXED_N_MARK and "pred_error" in job:
      marks.append((f"{label} (n = N only)", job["method"], _mean(job["pred_error"]), False))
      if "pred_error_fixed_x" in job:
        marks.append((f"{label} on its training X", job["method"], _mean(job["pred_error_fixed_x"]), True))
  for name in ("ista", "fista", "lasso"):
    if f"{name}_per_prompt_length" in refs:
      series.append((LABELS[name], {int(n): v for n, v in refs[f"{name}_per_prompt_length"].items()}))
  if not series and not marks:
    return None
  ns = sorted(set().union({N} if marks else set(), *[s.keys() for _, s in series]))
  fig, ax = plt.subplots(figsize=(8, 4))
  rows = []
  # References in greys, so that red means the meta-trained marks only (the paper's "red marks").
  ref_colors = {LABELS["ista"]: "0.6", LABELS["fista"]: "0.4", LABELS["lasso"]: "k"}
  for label, s in series:
    xs = sorted(s)
    ax.plot(xs, [s[n] for n in xs], marker="o", label=label, color=ref_colors.get(label),
            ls="--" if label in ref_colors else "-")
    rows.append(f"| {label} | " + " | ".join(f"{s[n]:.3g}" if n in s else "" for n in ns) + " |")
  for label, method, value, on_fixed_x in marks:
    ax.scatter([N], [value], marker=FIXED_N_MARK[method], s=60, zorder=3, label=label,
               color="k" if on_fixed_x else "tab:red" if method.endswith("_meta") else "tab:blue")
    rows.append(f"| {label} | " + " | ".join(f"{value:.3g}" if n == N else "" for n in ns) + " |")
  note = _beyond_training_n(ax, N, ns)
  if marks:
    note += [f"LISTA / LISTA-CP / ALISTA hold weights for exactly N = {N} measurements, so they have "
             "a value at n = N only (marks in the figure: tested on varying X, the meta-trained ones "
             "red; black, tested on the one X they were trained on).", ""]
  if notes:
    note += [" ".join(notes), ""]
  S = cfg["problem"]["s"]
  title = (f"Figure 1a setting (S = {S}): error vs prompt length" if support is None else
           f"Figure 1b setting (S = {S}, support in first {support}): error vs prompt length")
  path = _save_log_figure(fig, ax, out_dir, "prompt_length" + (f"_support{support}" if support else ""),
                          xlabel="prompt length n (demonstrations seen)", ylabel="prediction error",
                          title=f"{title}  [{cfg['name']}]", legend_outside=True)
  table = [f"### {title} (trained at N = {N})", "", *note,
           "| method | " + " | ".join(f"n={n}" for n in ns) + " |", "|---|" + "---:|" * len(ns), *rows, ""]
  return path, table


def report(workdirs: list[str], out_dir: str | None = None) -> tuple[list[str], str]:
  """Writes the figures and results.md; returns (figure paths, markdown path)."""
  if not workdirs:
    raise ValueError("WORKDIR: expected at least one run directory")
  runs = [load(workdir) for workdir in workdirs]   # every WORKDIR checked before anything is written
  out_dir = out_dir or os.path.join(workdirs[0], "report")
  os.makedirs(out_dir, exist_ok=True)
  figures, md, subs = [], ["# Results", ""], set()
  for workdir, run in zip(workdirs, runs):
    cfg = run["config"]
    md += [f"## Run `{cfg['name']}` ({workdir})", "",
           f"d = {cfg['problem']['d']}, N = {cfg['problem']['n']}, S = {cfg['problem']['s']}, "
           f"seeds = {cfg['seeds']}, prediction error = mean (y_query - ŷ_query)² over "
           f"{cfg['eval']['num_tasks']} test tasks.", ""]
    clip = cfg["tf"].get("small_tf_score_clip", 0.0)
    if clip:
      md += [f"Small TF here caps every attention weight at {clip:g} (`tf.small_tf_score_clip`), "
             "not the paper's ReLU attention.", ""]
    sub = out_dir
    if len(workdirs) > 1:   # one folder per run; runs/a/x and runs/b/x get x and x-2
      base = name = os.path.basename(os.path.normpath(workdir))
      n = 1
      while name in subs:
        n += 1
        name = f"{base}-{n}"
      subs.add(name)
      sub = os.path.join(out_dir, name)
    os.makedirs(sub, exist_ok=True)
    parts = [bar_figure(run, "fig1a", sub), bar_figure(run, "fig1b", sub, support=cfg["fig1b"]["support"]),
             fig1c(run, sub), curves(run, "fig2", sub), curves(run, "fig3", sub), layers(run, sub),
             per_layer(run, sub), prompt_length(run, sub),
             prompt_length(run, sub, support=cfg["fig1b"]["support"]) if "fig1b" in run["studies"] else None,
             transformer_training(run, sub)]
    for part in parts:
      if part is not None:
        path, table = part
        figures.append(path)
        md += table + [f"![]({os.path.relpath(path, out_dir)})", ""]
    if run.get("classical_table"):
      md += ["### Classical baselines", "", run["classical_table"], ""]
    spread_path = os.path.join(workdir, "spread.json")
    if os.path.exists(spread_path):   # written by `python -m experiments.spread --workdir=WORKDIR`
      from experiments import spread
      out = json.load(open(spread_path))
      md += ["### Test-set spread (`experiments.spread`)", "", spread.table(out, out.get("below")), ""]
      if out.get("with"):
        md += ["Jobs labelled [name] were trained in another run, scored on the same test sets "
               f"(`--with`): {', '.join(f'`{w}`' for w in out['with'])}.", ""]
      paired = spread.paired_table(out)
      if paired:
        md += ["Paired by test set:", "", paired, ""]
      if out.get("tails"):
        md += ["### Where the mean error comes from (`experiments.spread --tails`)", "", spread.tails_table(out), ""]
    md += unfinished_table(run)
  md_path = os.path.join(out_dir, "results.md")
  with open(md_path, "w") as f:
    f.write("\n".join(md))
  return figures, md_path


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="run directories of experiments.main")
  parser.add_argument("--out", default=None, help="output directory (default: WORKDIR/report)")
  args = parser.parse_args(argv)
  try:
    figures, md_path = report(args.workdirs, args.out)
  except (FileNotFoundError, ValueError) as e:
    print(f"report: {e}", file=sys.stderr)
    return 2
  print(open(md_path).read())
  for path in figures:
    print(f"figure: {path}")
  print(f"table: {md_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
