"""Data-parallel training over all devices with `jax.sharding`, and multi-host start-up.

One 1-D `Mesh` with axis "data" over every device (of every process, after
`initialize(multihost=True)`). Parameters, optimizer state and keys are replicated; each
training batch is sampled on device inside the compiled step and sharded along its leading
(instance) axis by a sharding constraint, so XLA partitions the forward and backward pass by
instances and all-reduces the gradients. With partitionable threefry (the JAX default) the
sampled numbers do not depend on the sharding, so a run on 4 devices sees exactly the data of
a run on 1 device and matches it up to the order of floating-point reductions.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from l2o_jax.train import Objective

AXIS = "data"


def initialize(multihost: bool = False, **kwargs) -> None:
  """Calls `jax.distributed.initialize(**kwargs)` when `multihost` (one process per host; on
  TPU pods and SLURM/Open MPI GPU clusters the coordinator is discovered automatically,
  otherwise pass coordinator_address, num_processes, process_id). No-op otherwise."""
  if multihost:
    jax.distributed.initialize(**kwargs)


def data_mesh(devices=None) -> Mesh:
  """A 1-D mesh with axis "data" over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("devices: expected at least one device, got none")
  return Mesh(np.asarray(devices), (AXIS,))


def replicate(tree, mesh: Mesh):
  """Places every leaf of `tree` fully replicated on the mesh."""
  sharding = NamedSharding(mesh, P())
  return jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding), tree)


def shard_batch(batch, mesh: Mesh):
  """Inside jit: constrains each leaf's leading (instance) axis to be split over "data".

  Leaves whose leading size is not a multiple of the device count (or scalars) stay replicated.
  """
  size = mesh.devices.size

  def constrain(x):
    if x.ndim >= 1 and x.shape[0] % size == 0:
      return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(AXIS)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P()))

  return jax.tree_util.tree_map(constrain, batch)


def data_parallel(objective: Objective, mesh: Mesh) -> Objective:
  """The same objective with every sampled batch sharded over the mesh's "data" axis."""
  if mesh.devices.size == 1:
    return objective
  sample = objective.sample
  return objective._replace(sample=lambda key: shard_batch(sample(key), mesh))


def check_batch(batch: int, mesh: Mesh, name: str = "batch") -> None:
  """Data parallelism splits the instances evenly: the batch must divide by the device count."""
  size = mesh.devices.size
  if batch % size:
    raise ValueError(f"{name}: expected a multiple of the number of devices ({size}) for data "
                     f"parallel training, got {batch}")
