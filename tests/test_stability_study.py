"""experiments.small_tf_stability: its window statistics, and a tiny run end to end."""
import json
import os
import subprocess
import sys

import numpy as np

from experiments import small_tf_stability as study

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_window_stats_counts_nonfinite_and_large_losses():
  losses = np.array([1.0, 3.0, np.nan, 2.0, 500.0, np.inf, 4.0, 7.0])
  w = study.window_stats(losses, 4)
  assert w == [{"step": 4, "median": 2.0, "max_finite": 3.0, "nonfinite": 1, "over_100": 0},
               {"step": 8, "median": 7.0, "max_finite": 500.0, "nonfinite": 1, "over_100": 1}]


def test_tiny_study_runs_and_rejects_unknown_variants(child_env):
  base = [sys.executable, "-m", "experiments.small_tf_stability", "--num_layers=1", "--d=4",
          "--batch=8", "--test_tasks=64"]
  proc = subprocess.run(base + ["--variants=lr1e-4,wd0.1", "--steps=20", "--window=10"], cwd=REPO,
                        env=child_env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  assert [r["variant"] for r in rows] == ["lr1e-4", "wd0.1"]
  for r in rows:
    assert [w["step"] for w in r["windows"]] == [10, 20] and r["skipped"] == 0
    assert np.isfinite(r["test_mean"]) and r["test_nonfinite"] == 0 and r["test_median"] > 0
  bad = subprocess.run(base + ["--variants=lr1e-4,adam"], cwd=REPO, env=child_env, capture_output=True,
                       text=True, timeout=120)
  assert bad.returncode != 0 and "variants: unknown ['adam']" in bad.stderr
