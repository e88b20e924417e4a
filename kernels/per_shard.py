"""Running an op on each device's shard of the batch (`jax.shard_map` over the mesh's `data` axis).

Lives with the kernels because the lowest layers need it (the deformable-attention dispatch, the Hungarian
matcher's host callback) and imports flow kernels <- modeling <- losses <- training; the mesh itself is built in
dimaskdino_jax/training/sharding.py. Under `jax.set_mesh(mesh)` at trace time with a `data` axis of size > 1, a
wrapped op is traced once per shard shape and runs on every device with its own rows only (no gather); with no
mesh, or a data axis of size 1, the op is called directly (nothing added on one device).
"""

import jax
from jax.sharding import PartitionSpec

DATA = 'data'  # the batch axis of the mesh


def data_size() -> int:
  """Size of the `data` axis of the mesh set with `jax.set_mesh` at trace time (1 when none, or inside a
  shard_map that already made `data` manual)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or DATA not in mesh.axis_names or DATA in getattr(mesh, 'manual_axes', ()):
    return 1
  return int(mesh.shape[DATA])


def _spec(axis):
  return PartitionSpec() if axis is None else PartitionSpec(*([None] * axis), DATA)


def per_shard(fn, batch_axes, out_batch_axes):
  """`fn` run per shard of the batch when the trace-time mesh has a data axis > 1; `fn` itself otherwise.

  batch_axes: for each positional argument, the index of its batch axis (None: the argument is replicated).
  out_batch_axes: the same for the outputs (an int for one output, a tuple for several).
  """

  def wrapped(*args):
    n = data_size()
    if n == 1:
      return fn(*args)
    for a, axis in zip(args, batch_axes):
      if axis is not None and a.shape[axis] % n:
        name = getattr(fn, '__name__', repr(fn))
        raise ValueError(f'{name}: batch axis {axis} of shape {a.shape} is not divisible by the {n} data shards')
    out_specs = jax.tree.map(_spec, out_batch_axes)
    in_specs = tuple(_spec(a) for a in batch_axes)
    # All mesh axes manual (callbacks need it); arrays are replicated over the axes other than `data`.
    return jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs)(*args)

  return wrapped
