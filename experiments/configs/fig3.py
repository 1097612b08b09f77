"""Figure 3 (Appendix F): meta-trained LISTA-VM, test error on varying X per epoch."""
from experiments.configs.base import base


def get_config():
  c = base()
  c.name = "fig3"
  c.studies = "fig3"
  return c
