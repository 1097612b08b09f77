"""Figure 2 (Appendix F): meta-trained LISTA and LISTA-CP, test error on varying X per epoch
(340 epochs of 100 matrices x 500 instances)."""
from experiments.configs.base import base


def get_config():
  c = base()
  c.name = "fig2"
  c.studies = "fig2"
  return c
