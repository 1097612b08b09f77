"""Figure 1c (section 6, Theorem 5.2): Small TF with linear, query and query-dagger read-outs,
prediction error vs prompt length n."""
from experiments.configs.base import base


def get_config():
  c = base()
  c.name = "fig1c"
  c.studies = "fig1c"
  return c
