"""Figure 1b (section 6): support restricted to the first 10 coordinates, incl. LISTA-VM-SS."""
from experiments.configs.base import base


def get_config():
  c = base()
  c.name = "fig1b"
  c.studies = "fig1b"
  c.fig1b.support = 10  # S = {1, ..., 10}
  return c
