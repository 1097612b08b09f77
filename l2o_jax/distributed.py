"""Data-parallel training over all devices with `jax.sharding`, and multi-host start-up.

One 1-D `Mesh` with axis "data" over every device (of every process, after
`initialize(multihost=True)`). Parameters, optimizer state and keys are replicated; each
training batch is sampled on device inside the compiled step and sharded along its leading
(instance) axis by a sharding constraint. Each device differentiates its own instances inside
`jax.shard_map`, and one all-reduce per step (of the gradient pytree and the loss, which XLA
combines into a single tuple all-reduce) averages the gradients (`mean_value_and_grad`). With partitionable threefry (the JAX default) the sampled numbers do
not depend on the sharding, so a run on 4 devices sees exactly the data of a run on 1 device
and matches it up to the order of floating-point reductions.

Several processes (`initialize(multihost=True)`: hosts of a cluster, or processes on one machine,
whose CPU collectives then go through gloo) run the same program: each initialises the same state,
`replicate` fills its own devices, and the mesh spans them all (tests/test_distributed.py trains
two processes of two CPU devices each and checks them against one device).

On a CPU, `set_cpu_devices` splits the host into one JAX device per core before JAX starts, and
the same data parallelism then runs one instance stream per core. XLA:CPU parallelises little
beyond its larger GEMMs, so on 2 cores train steps run faster this way: Small TF 1.6x, LISTA-VM
2.0x, GPT-2 1.1x (`python -m benchmarks.micro --only=devices`; BUILD_NOTES).
"""
from __future__ import annotations

import functools
import numbers
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from l2o_jax import _checks
from l2o_jax.train import Objective

AXIS = "data"


def initialize(multihost: bool = False, **kwargs) -> None:
  """Calls `jax.distributed.initialize(**kwargs)` when `multihost` (one process per host; on
  TPU pods and SLURM/Open MPI GPU clusters the coordinator is discovered automatically,
  otherwise pass coordinator_address, num_processes, process_id). No-op otherwise."""
  if multihost:
    jax.distributed.initialize(**kwargs)


def usable_cores() -> int:
  """CPU cores this process may run on (its affinity mask, not the machine's core count)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # pragma: no cover - not on Linux
    return os.cpu_count() or 1


def auto_cpu_devices(batches=(), min_per_device: int = 16) -> int:
  """One device per usable core, reduced to the largest count that divides every batch size
  and leaves each device at least `min_per_device` instances of the smallest batch.

  The floor is a guess, not a measurement (only 2-core hosts were measured: 32 instances per
  device there): far below it each device's GEMMs get too small to pay for the per-step
  all-reduce across many devices."""
  if isinstance(batches, numbers.Number) or not hasattr(batches, "__iter__"):
    raise ValueError(f"batches: expected a sequence of batch sizes such as (64,), got {batches!r}")
  batches = [_checks.check_positive_int("batches", b) for b in batches]
  min_per_device = _checks.check_positive_int("min_per_device", min_per_device)
  n = usable_cores()
  if batches:
    n = min(n, max(1, min(batches) // min_per_device))
  while n > 1 and any(b % n for b in batches):
    n -= 1
  return max(n, 1)


def set_cpu_devices(n: int) -> int:
  """Makes JAX's CPU backend present `n` devices (`jax_num_cpu_devices`); returns `n`.

  Must run before JAX initialises its backends (before the first array is created or
  computation run); afterwards it only succeeds if the CPU backend already has `n` devices.
  It does not change which platform JAX uses: on a GPU or TPU host the accelerators stay the
  default devices and the CPU devices go unused.
  """
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise ValueError(f"n: expected a positive integer number of CPU devices, got {n!r}")
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:
    have = len(jax.devices("cpu"))
    if have != n:
      raise ValueError(f"n: JAX's backends are already initialised with {have} CPU device(s), so "
                       f"{n} cannot be set; call set_cpu_devices before any JAX computation") from None
  return n


def data_mesh(devices=None) -> Mesh:
  """A 1-D mesh with axis "data" over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("devices: expected at least one device, got none")
  return Mesh(np.asarray(devices), (AXIS,))


def replicate(tree, mesh: Mesh):
  """Places every leaf of `tree` fully replicated on the mesh.

  With several processes (`initialize(multihost=True)`) every process must pass the same
  values (as `train.fit` does: each initialises the same seeds); each fills only its own
  devices, since `jax.device_put` cannot address another process's.
  """
  sharding = NamedSharding(mesh, P())
  if sharding.is_fully_addressable:
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding), tree)

  def global_copy(x):
    if jnp.issubdtype(jnp.result_type(x), jax.dtypes.prng_key):   # typed keys: via their data
      return jax.random.wrap_key_data(global_copy(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree_util.tree_map(global_copy, tree)


def shard_batch(batch, mesh: Mesh):
  """Inside jit: constrains each leaf's leading (instance) axis to be split over "data".

  Every non-scalar leaf must lead with the instance axis (same size B, a multiple of the device
  count; else ValueError); scalars stay replicated. Data shared by all instances belongs in the
  loss's closure, not the batch.
  """
  return jax.tree_util.tree_map(
      lambda x, spec: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec)),
      batch, _batch_specs(batch, mesh.devices.size))


def data_parallel(objective: Objective, mesh: Mesh) -> Objective:
  """The same objective with every sampled batch sharded over the mesh's "data" axis, and its
  gradient taken per device and averaged by one all-reduce (`mean_value_and_grad`).

  The loss must be a mean over the batch's leading (instance) axis plus any terms that depend
  on the parameters only, as every l2o_jax objective is: then the mean of the per-device
  losses and gradients is the full batch's.
  """
  if mesh.devices.size == 1:
    return objective
  # The batch's shapes, without sampling: a batch that does not split over the devices is a
  # ValueError here, not first while the train chunk compiles.
  _batch_specs(jax.eval_shape(objective.sample, jax.random.key(0)), mesh.devices.size)
  sample = objective.sample
  return objective._replace(sample=lambda key: shard_batch(sample(key), mesh),
                            value_and_grad=functools.partial(mean_value_and_grad, mesh=mesh))


def mean_value_and_grad(loss, params, batch, *, mesh: Mesh):
  """(loss, grads) of `loss` on a batch split over the mesh: each device differentiates its
  shard, then one `psum` of the pytree (every gradient and the loss) averages them. XLA's
  all-reduce combiner makes that a single tuple all-reduce, one rendezvous per step.

  Why not let XLA partition `jax.value_and_grad`: it all-reduces each weight gradient where it
  is formed, and XLA:CPU's in-process all-reduce then synchronises the devices once per buffer
  (61 rendezvous per Small TF step), which cost ~10 ms of a ~55 ms two-device step on 2 cores
  (ad-hoc profile and A/B, BUILD_NOTES; that version is gone from the code). Why not ravel the
  gradients into one flat buffer first (the previous version): XLA:CPU builds it in one loop
  fusion that recomputes every element's multi-dimensional index, ~2 ms of a ~35 ms Small TF
  step (BUILD_NOTES).
  """
  size = mesh.devices.size

  def local(params, batch):
    # Per-device gradients (nothing is summed until the psum below).
    value, grads = jax.value_and_grad(loss)(params, batch)
    value, grads = jax.lax.psum((value, grads), AXIS)
    return value / size, jax.tree_util.tree_map(lambda g: g / size, grads)

  return per_device(local, params, batch, mesh=mesh)


def per_device(fn, params, batch, *, mesh: Mesh):
  """fn(params, shard) on every device inside `jax.shard_map`: params replicated, the batch's
  leaves split along their leading (instance) axis (`shard_batch`'s rule), scalars replicated.
  fn must return replicated values (e.g. after a psum)."""
  specs = _batch_specs(batch, mesh.devices.size)
  # check_vma=False: the loss is any user function, traced per device as written; with the
  # varying-axes type check on, ordinary code such as a lax.scan whose carry starts at
  # jnp.zeros(...) and then meets per-device data would be rejected (LISTA's layer loop is one).
  return jax.shard_map(fn, mesh=mesh, in_specs=(P(), specs), out_specs=P(), check_vma=False)(params, batch)


def _batch_specs(batch, size: int):
  """P("data") for every batch leaf with a leading (instance) axis, P() for scalars.

  Every non-scalar leaf must lead with the same instance count B (a multiple of the device
  count): a leaf shared by all instances (a fixed matrix, say) would otherwise be split as if
  it held instances, silently changing the loss. Such data belongs in the loss's closure."""
  sizes = {np.shape(x)[0] for x in jax.tree_util.tree_leaves(batch) if np.ndim(x) >= 1}
  if len(sizes) > 1:
    raise ValueError(f"batch: expected every leaf to lead with the same instance count (data "
                     f"parallelism splits that axis), got leading sizes {sorted(sizes)}; pass data "
                     "shared by all instances through the loss's closure, not the batch")
  if sizes and sizes.pop() % size:
    raise ValueError(f"batch: expected the instance count to be a multiple of the number of devices "
                     f"({size}), got leading size {np.shape(jax.tree_util.tree_leaves(batch)[0])[0]}")
  return jax.tree_util.tree_map(lambda x: P(AXIS) if np.ndim(x) >= 1 else P(), batch)


def check_batch(batch: int, mesh: Mesh, name: str = "batch") -> None:
  """Data parallelism splits the instances evenly: the batch must divide by the device count."""
  size = mesh.devices.size
  _checks.check_positive_int(name, batch)
  if batch % size:
    raise ValueError(f"{name}: expected a multiple of the number of devices ({size}) for data "
                     f"parallel training, got {batch}")
