"""Data parallelism: the device mesh, batch / state shardings, per-shard host work, multi-host start-up.

The mesh has two named axes, `data` x `model` (config.mesh.data, config.mesh.model; -1 = all devices). Only data
parallelism is implemented: `model` must be 1 (it is there so a second axis can be added without renaming specs).
The global batch is sharded on `data` (`shard_batch`: each process passes its own rows, see
`jax.make_array_from_process_local_data`); params and optimizer state are replicated (`replicated`). The train
step is one `jax.jit` with these in / out shardings and the state donated (trainer.py), traced under
`jax.set_mesh(mesh)`. What depends on the whole batch is computed on global arrays: the normalizer (the number of
GT boxes of the global batch), the DN draws and the DN layout's largest GT count (`trainer.dn_draws`), the random
mask points. Then either (`trainer.flat_gradient_sum`, whenever the losses draw no mask points) each shard's
losses and gradients run in one `jax.shard_map` and are summed over the shards as one flat vector, or XLA
partitions the model and the losses, and the ops it cannot partition find the mesh at trace time and run per
shard in `jax.shard_map` (`per_shard`): the Hungarian matching's host callback (each device hands its own images
to scipy; no device gathers the batch) and the deformable-attention op (a Pallas kernel is opaque to the
partitioner). Either way a step gives the single-device result for the same global batch up to floating-point
summation order; with one device (`data_size() == 1`) nothing is wrapped at all.

Multi-host (`initialize_distributed`): `jax.distributed.initialize` from explicit flags, or the environment
variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID, or a SLURM job step (jax's own cluster
detection); a single process needs none of it.
"""

import logging
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kernels.per_shard import DATA, data_size, per_shard  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

MODEL = 'model'
AXES = (DATA, MODEL)


# Host-callback input per device below which as many host devices as cores ran without the deadlock of jax 0.10.2's
# pure_callback (docs/jax_notes.md, "Several host devices on a CPU": ~80 KB passed, ~120 KB and more hung).
CALLBACK_SAFE_BYTES = 64 << 10


def host_callback_bytes(config, devices: int) -> int:
  """Upper estimate of the largest host-callback input (bytes) one of `devices` data shards hands to NumPy in a
  training step: the Hungarian matching's stacked costs (matched sets x images x queries x GT) and, with sampled
  mask points, the point losses' top-k rows (masks x oversampled candidates)."""
  m, g = config.model, int(config.data.max_instances)
  images = max(1, int(config.train.batch_size) // max(1, devices))
  di, dn = m.get('di') or {}, m.get('dn') or {}
  sets = int(m.decoder.num_layers) + 4  # the decoder layers' and the other matched sets (7 for configs/shapes.py)
  queries = max([int(m.decoder.num_queries), *(int(k) for k in di.get('selection_ks', ()))])
  costs = sets * images * queries * g * 4
  points = int(config.loss.get('num_points', 0))
  top_k = 0
  if points > 0:
    rows = images * (g + int(dn.get('num', 0))) * sets
    top_k = rows * int(points * float(config.loss.get('oversample_ratio', 1.0))) * 4
  return max(costs, top_k)


def format_bytes(n: int) -> str:
  """'54 KiB', '2.2 GiB': a byte count for messages."""
  for unit, shift in (('GiB', 30), ('MiB', 20)):
    if n >= 1 << shift:
      return f'{n / (1 << shift):.1f} {unit}'
  return f'{n >> 10} KiB'


def deadlock_prone_callback_bytes(config, devices: int, cpu_count: int, shards: int | None = None) -> int | None:
  """The estimated host-callback input per device (host_callback_bytes, the batch split in `shards`, default
  `devices`) when `devices` CPU devices of one process on `cpu_count` cores may deadlock jax 0.10.2: at least two
  devices, no core to spare, more than CALLBACK_SAFE_BYTES. Else None."""
  if devices < 2 or devices < cpu_count:
    return None
  size = host_callback_bytes(config, devices if shards is None else shards)
  return size if size > CALLBACK_SAFE_BYTES else None


def callback_deadlock_warning(config, mesh: Mesh, cpu_count: int | None = None) -> str | None:
  """A warning when this process runs the step on CPU devices whose host callbacks may deadlock
  (`deadlock_prone_callback_bytes`; jax 0.10.2 then hangs in the first step); None otherwise."""
  local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  cpu_count = (os.cpu_count() or 1) if cpu_count is None else cpu_count
  if not local or local[0].platform != 'cpu':
    return None
  size = deadlock_prone_callback_bytes(config, len(local), cpu_count, shards=int(mesh.shape[DATA]))
  if size is None:
    return None
  return (
    f'{len(local)} CPU devices on {cpu_count} cores with ~{format_bytes(size)} of host-callback input per device: '
    "jax 0.10.2's pure_callback can deadlock here (docs/jax_notes.md, 'Several host devices on a CPU'); use "
    'fewer host devices than cores (--xla_force_host_platform_device_count) or one per process'
  )


class MeshError(ValueError):
  """A mesh / batch size that cannot work on these devices; the message names the config field."""


def mesh_shape(config, num_devices: int) -> tuple[int, int]:
  """(data, model) axis sizes from config.mesh (-1 = the devices left), checked against `num_devices`."""
  spec = config.get('mesh', None)
  data = int(spec.data) if spec is not None else -1
  model = int(spec.model) if spec is not None else 1
  if model != 1:
    raise MeshError(f'mesh.model = {model}: only data parallelism is implemented; set --config.mesh.model=1')
  if data == -1:
    data = num_devices // model
  if data < 1 or data * model > num_devices:
    raise MeshError(
      f'mesh.data = {data} x mesh.model = {model} needs {data * model} devices, {num_devices} available; '
      'set --config.mesh.data=-1 (all devices) or a smaller value'
    )
  return data, model


def make_mesh(config=None, devices=None) -> Mesh:
  """The (data, model) mesh over `devices` (default all devices of all processes; the first data x model)."""
  devices = list(jax.devices() if devices is None else devices)
  data, model = mesh_shape(config if config is not None else {}, len(devices))
  if data * model < len(devices) and jax.process_count() > 1:
    raise MeshError(f'mesh.data = {data}: with several processes the mesh must span all {len(devices)} devices')
  grid = np.asarray(devices[: data * model], dtype=object).reshape(data, model)
  return Mesh(grid, AXES)  # Auto axis types: XLA partitions everything not in shard_map


def check_batch(config, mesh: Mesh) -> int:
  """The per-process batch size; fails naming train.batch_size when it does not divide over devices / processes."""
  b = int(config.train.batch_size)
  n = mesh.shape[DATA]
  if b % n:
    raise MeshError(
      f'train.batch_size = {b} is not divisible by the {n} devices of the mesh data axis (mesh.data); use a '
      f'multiple of {n} (--config.train.batch_size) or fewer devices (--config.mesh.data)'
    )
  procs = jax.process_count()
  if b % procs:
    raise MeshError(f'train.batch_size = {b} is not divisible by the {procs} processes')
  return b // procs


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def put_replicated(tree, mesh: Mesh):
  """A host-computed pytree (the same on every process, e.g. a seeded init) replicated on every device of `mesh`.

  One process: `jax.device_put`. Several: each process fills its own devices from its copy
  (`jax.make_array_from_callback`; device_put cannot target other processes' devices). PRNG key leaves keep their
  key type.
  """
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def one(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(one(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis on `data`, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(DATA))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Host numpy batch of THIS process (its rows of the global batch, in process order) -> global jax arrays."""
  sharding = batch_sharding(mesh)
  procs = jax.process_count()
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    out[k] = jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * procs, *v.shape[1:]))
  return out


ENV_ADDRESS = 'JAX_COORDINATOR_ADDRESS'
ENV_NUM = 'JAX_NUM_PROCESSES'
ENV_ID = 'JAX_PROCESS_ID'


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None) -> bool:
  """Starts jax.distributed when asked for; returns True if it did. Call before any other jax call.

  Explicit arguments win, then the environment variables JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
  JAX_PROCESS_ID, then a SLURM job step with more than one task (SLURM_NTASKS > 1 under srun: jax reads the
  coordinator, process count and id from SLURM itself). Nothing given: a single process, nothing to do.
  """
  address = coordinator_address or os.environ.get(ENV_ADDRESS) or None
  num = num_processes if num_processes is not None else _env_int(ENV_NUM)
  pid = process_id if process_id is not None else _env_int(ENV_ID)
  if address or num is not None or pid is not None:
    given = (('coordinator address', address), ('process count', num), ('process id', pid))
    missing = [n for n, v in given if v is None]
    if missing:
      raise MeshError(
        f'multi-host start-up needs the coordinator address, the process count and the process id; missing: '
        f'{", ".join(missing)} (flags --coordinator_address / --num_processes / --process_id or the environment '
        f'variables {ENV_ADDRESS} / {ENV_NUM} / {ENV_ID})'
      )
    if num == 1:
      return False
    jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
    return True
  if int(os.environ.get('SLURM_NTASKS', '1') or 1) > 1 and 'SLURM_STEP_ID' in os.environ:
    jax.distributed.initialize()  # jax's SLURM detection: coordinator = first node, id = SLURM_PROCID
    return True
  return False


def _env_int(name):
  value = os.environ.get(name)
  if value in (None, ''):
    return None
  try:
    return int(value)
  except ValueError as e:
    raise MeshError(f'environment variable {name}={value!r} is not an integer') from e
