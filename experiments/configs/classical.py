"""The classical baselines table: ISTA / FISTA (K = 12) and converged LASSO for several lam,
plus the exhaustive-support oracle (no training)."""
from experiments.configs.base import base


def get_config():
  c = base()
  c.name = "classical"
  c.studies = "classical"
  return c
