"""How far two certified LASSO solutions lie apart in beta: `lasso` (float32) and `lasso_batch`
against scikit-learn's coordinate descent in float64 (tol 1e-14), on paper-setting tasks.

  python -m benchmarks.lasso_accuracy [--tasks 256]

The certificate bounds the relative objective gap (tol 1e-5 in float32), not beta: on the flat
directions of an n < d problem a tiny gap allows a visible difference in beta.
"""
from __future__ import annotations

import argparse

import jax
import numpy as np

import l2o_jax as L


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tasks", type=int, default=256)
  args = p.parse_args(argv)
  from sklearn.linear_model import Lasso   # the test extra's oracle, not a core dependency
  t = L.sample_tasks(jax.random.key(0), args.tasks, d=20, n=10, s=3)
  X, y = np.asarray(t.X, np.float64), np.asarray(t.y, np.float64)
  n = X.shape[1]
  for lam in (0.1, 1.0):
    sk = np.stack([Lasso(alpha=lam / n, fit_intercept=False, tol=1e-14, max_iter=10 ** 6).fit(X[i], y[i]).coef_
                   for i in range(args.tasks)])
    ours = np.abs(np.asarray(jax.vmap(lambda X, y: L.lasso(X, y, lam))(t.X, t.y), np.float64) - sk).max(1)
    batch = np.abs(np.asarray(L.lasso_batch(t.X, t.y, lam).beta, np.float64) - sk).max(1)
    print(f"lam={lam}, {args.tasks} tasks: max |beta - beta_sklearn| per task, median / max: "
          f"lasso {np.median(ours):.1e} / {ours.max():.1e}, lasso_batch {np.median(batch):.1e} / {batch.max():.1e}")


if __name__ == "__main__":
  main()
