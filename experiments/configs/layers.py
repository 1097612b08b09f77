"""Theorem 5.1 study: prediction error vs depth K = 1..24 of the explicitly constructed
Transformer (from a meta-trained LISTA-VM with K layers), against ISTA and FISTA at K steps."""
from experiments.configs.base import base


def get_config():
  c = base()
  c.name = "layers"
  c.studies = "layers"
  c.layers.ks = ",".join(str(k) for k in range(1, 25))
  c.layers.steps = 34000  # per K; the paper's 340 epochs x 50,000 instances
  return c
