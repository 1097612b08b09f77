"""Figure 1a (section 6): in-context sparse recovery, S = 3, no support prior; every method.
Full preset (GPU/TPU): LISTA family 340 epochs x 50,000 instances; Small TF / GPT-2 10^6 x 64."""
from experiments.configs.base import base


def get_config():
  c = base()
  c.name = "fig1a"
  c.studies = "fig1a"  # also yields the prompt-length curves of the trained models
  return c
