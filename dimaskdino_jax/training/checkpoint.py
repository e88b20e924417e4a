"""Checkpoints: a thin wrapper over orbax's CheckpointManager in WORKDIR/checkpoints.

Each step directory holds three items, written by one `ocp.args.Composite`:

  state  the training state pytree (params, opt_state, step, rng, ...): `ocp.args.StandardSave`.
  data   the input pipeline's iterator state, one JSON file per process (`process_{i}-of-{n}.json`, as grain's own
         handler writes it): a dict (grain `DatasetIterator.get_state()`) or bytes (`DataLoaderIterator.get_state()`).
  meta   JSON: step, config name, metrics.

The config is written beside as WORKDIR/config.json. Saving is asynchronous: call `wait_until_finished()` before the
process exits. Orbax writes every checkpoint into a temporary directory and renames it when complete, so a crash
mid-save leaves a `<step>.orbax-checkpoint-tmp-*` directory that is never listed nor restored.

Restoring takes an abstract state whose leaves are `jax.ShapeDtypeStruct(shape, dtype, sharding=...)` (see
`abstract_state`), so a checkpoint written on one device layout restores onto another (different device count).
"""

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

CHECKPOINT_DIR = 'checkpoints'
CONFIG_FILE = 'config.json'


class DataStateHandler(ocp.CheckpointHandler):
  """Saves / restores a JSON-able iterator state, one file per process (like grain's CheckpointHandler).

  The stored JSON is {'format': 'json' | 'bytes', 'state': ...}; bytes states (grain DataLoader) are stored as
  UTF-8 text and come back as bytes.
  """

  def save(self, directory: epath.Path, args: 'DataStateSave'):
    state = args.state
    if isinstance(state, bytes):
      record = {'format': 'bytes', 'state': state.decode('utf-8')}
    else:
      record = {'format': 'json', 'state': state}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / _process_file()).write_text(json.dumps(record))

  def restore(self, directory: epath.Path, args: 'DataStateRestore' = None):
    path = directory / _process_file()
    if not path.exists():
      found = sorted(p.name for p in directory.iterdir()) if directory.exists() else []
      raise FileNotFoundError(f'{path}: no data-iterator state for this process (found {found})')
    record = json.loads(path.read_text())
    return record['state'].encode('utf-8') if record['format'] == 'bytes' else record['state']

  def metadata(self, directory: epath.Path):
    return None

  def finalize(self, directory: epath.Path):
    pass

  def close(self):
    pass

  @classmethod
  def typestr(cls):
    return f'{cls.__module__}.{cls.__qualname__}'


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


def _process_file() -> str:
  return f'process_{jax.process_index()}-of-{jax.process_count()}.json'


def replicated_sharding() -> NamedSharding:
  """A sharding that replicates an array on every device (of every process)."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ('devices',))
  return NamedSharding(mesh, PartitionSpec())


def abstract_state(tree, sharding=None):
  """ShapeDtypeStructs (with shardings) for every leaf of `tree`, for `restore_latest`.

  tree: a state of jax arrays (their own shardings are kept) or of ShapeDtypeStructs (e.g. from jax.eval_shape).
  sharding: a sharding for every leaf, or a pytree of shardings (a prefix of `tree`); default: each leaf's own
  sharding, else replicated on all devices.
  """
  default = replicated_sharding()

  def one(x, s=None):
    s = s or getattr(x, 'sharding', None) or default
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s)

  if sharding is None:
    return jax.tree.map(one, tree)
  if isinstance(sharding, jax.sharding.Sharding):
    return jax.tree.map(lambda x: one(x, sharding), tree)
  return jax.tree.map(lambda s, sub: jax.tree.map(lambda x: one(x, s), sub), sharding, tree)


def _jsonable(x):
  """Metrics / meta values as plain JSON types (jax and numpy scalars to float / int)."""
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, list | tuple):
    return [_jsonable(v) for v in x]
  if isinstance(x, str | bool | int | float) or x is None:
    return x
  arr = np.asarray(x)
  if arr.ndim == 0:
    return arr.item()
  return arr.tolist()


class Checkpointer:
  """Saves and restores (state, data iterator state, meta) in WORKDIR/checkpoints, keeping the last K.

  workdir: the run directory. config: the ml_collections config (its `train.keep_checkpoints` is K unless
  `max_to_keep` is given; it is written to WORKDIR/config.json by process 0). async_save: orbax's asynchronous saving.
  """

  def __init__(self, workdir, config=None, max_to_keep: int | None = None, async_save: bool = True):
    self.workdir = os.fspath(workdir)
    self.directory = os.path.join(os.path.abspath(self.workdir), CHECKPOINT_DIR)
    if max_to_keep is None:
      max_to_keep = int(config.train.keep_checkpoints) if config is not None else None
    self.config_name = str(config.get('name', '')) if config is not None else ''
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    if config is not None:
      self.save_config(config)

  def save_config(self, config):
    """Writes WORKDIR/config.json (process 0 only)."""
    if jax.process_index() != 0:
      return
    os.makedirs(self.workdir, exist_ok=True)
    with open(os.path.join(self.workdir, CONFIG_FILE), 'w') as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))

  def save(self, step: int, state, data=None, metrics=None) -> bool:
    """Starts saving checkpoint `step` (asynchronously); False if that step is already saved.

    state: the pytree to save. data: a grain iterator (its `get_state()` is saved) or its state (dict / bytes).
    metrics: scalars stored in the meta item.
    """
    step = int(step)
    if step in self._manager.all_steps():
      return False
    items = {
      'state': ocp.args.StandardSave(state),
      'meta': ocp.args.JsonSave(
        _jsonable({'step': step, 'config_name': self.config_name, 'metrics': dict(metrics or {})})
      ),
    }
    if data is not None:
      data_state = data.get_state() if hasattr(data, 'get_state') else data
      if not isinstance(data_state, bytes):
        data_state = json.loads(json.dumps(data_state))  # a private copy, and fail now if not JSON-able
      items['data'] = DataStateSave(data_state)
    return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True))

  def all_steps(self) -> list[int]:
    """Steps of complete checkpoints, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The step of the newest complete checkpoint, or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def restore(self, step: int, abstract_state, data_iterator=None) -> dict:
    """Restores checkpoint `step`: {'state': ..., 'data': iterator state or None, 'meta': dict}.

    abstract_state: the state's structure with ShapeDtypeStruct leaves carrying shardings (`abstract_state`).
    data_iterator: if given, its `set_state` is called with the restored iterator state.
    """
    step = int(step)
    if step not in self._manager.all_steps():
      raise FileNotFoundError(f'{self.directory}: no complete checkpoint for step {step} (have {self.all_steps()})')
    step_dir = epath.Path(self.directory) / str(step)
    items = {'state': ocp.args.StandardRestore(abstract_state), 'meta': ocp.args.JsonRestore()}
    has_data = (step_dir / 'data').exists()
    if has_data and not (step_dir / 'data' / _process_file()).exists():
      # Saved by a different number of processes: this process has no iterator state and its data order restarts.
      log.warning(
        '%s: no data-iterator state for process %d of %d; the input pipeline starts afresh',
        step_dir / 'data',
        jax.process_index(),
        jax.process_count(),
      )
      has_data = False
    if has_data:
      items['data'] = DataStateRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    out = {'state': restored['state'], 'data': restored.get('data') if has_data else None, 'meta': restored['meta']}
    if data_iterator is not None and out['data'] is not None:
      data_iterator.set_state(out['data'])
    return out

  def restore_latest(self, abstract_state, data_iterator=None) -> dict | None:
    """`restore` of the newest complete checkpoint, or None when there is none."""
    step = self.latest_step()
    if step is None:
      return None
    return self.restore(step, abstract_state, data_iterator=data_iterator)

  def wait_until_finished(self):
    """Blocks until pending asynchronous saves are written (call before exit and before reading them)."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
