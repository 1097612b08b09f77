"""The classical baselines table (issue 2): ISTA and FISTA at K iterations and the converged
LASSO, for several lam, on fresh tasks of the paper's setting (section 6, "Problem setup")."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import l2o_jax as L


def classical_rows(*, seed: int = 0, num_tasks: int = 4096, lams=(0.01, 0.03, 0.1, 0.3, 1.0),
                   num_iters: int = 12, d: int = 20, n: int = 10, s: int = 3, support=None,
                   noise_std: float = 0.0, include_oracle: bool = True) -> list[dict]:
  """Prediction error (y_query - x_query^T beta_hat)^2 averaged over `num_tasks` fresh tasks.

  Returns one dict per lam: {"lam", "ista", "fista", "lasso", "lasso_certified"} where
  "lasso_certified" is the fraction of tasks whose duality gap met the tolerance; with
  `include_oracle` a last row {"lam": None, "oracle": ...} gives the exhaustive-support oracle.
  """
  task = L.sample_tasks(jax.random.key(seed), num_tasks, d=d, n=n, s=s, support=support,
                        noise_std=noise_std)
  err = lambda beta: float(L.prediction_error(task.y_query, task.x_query, beta))
  rows = []
  for lam in lams:
    ista = L.batched(L.ista, lam=lam, num_iters=num_iters)(task.X, task.y)
    fista = L.batched(L.fista, lam=lam, num_iters=num_iters)(task.X, task.y)
    info = jax.jit(jax.vmap(lambda X, y: L.lasso(X, y, lam, return_info=True)))(task.X, task.y)
    rows.append({"lam": lam, "ista": err(ista), "fista": err(fista), "lasso": err(info.beta),
                 "lasso_certified": float(jnp.mean(info.converged))})
  if include_oracle:
    oracle = jax.jit(jax.vmap(lambda X, y: L.best_subset(X, y, s, support)))(task.X, task.y)
    rows.append({"lam": None, "oracle": err(oracle)})
  return rows


def format_table(rows: list[dict], num_iters: int = 12) -> str:
  """A markdown table of `classical_rows` output."""
  lines = [f"| lam | ISTA (K={num_iters}) | FISTA (K={num_iters}) | LASSO (converged) | gap certified |",
           "|---:|---:|---:|---:|---:|"]
  for r in rows:
    if r["lam"] is None:
      lines.append(f"| exhaustive-support oracle | | | {r['oracle']:.4g} | |")
    else:
      lines.append(f"| {r['lam']:g} | {r['ista']:.4f} | {r['fista']:.4f} | {r['lasso']:.4f} | "
                   f"{100 * r['lasso_certified']:.1f}% |")
  return "\n".join(lines)


if __name__ == "__main__":
  import time
  t0 = time.time()
  # Full float32 matmuls, as the launcher's default config.matmul_precision (on a GPU JAX would
  # otherwise use TF32, too coarse for the LASSO's duality-gap certificate); no-op on CPU.
  with jax.default_matmul_precision("highest"):
    rows = classical_rows()
  print("Prediction error on 4096 fresh tasks (d=20, N=10, S=3, noiseless):")
  print(format_table(rows))
  print(f"({time.time() - t0:.1f}s)")
