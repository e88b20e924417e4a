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
Before reading any array, `restore` compares the stored tree with the abstract state and raises
`CheckpointMismatchError` listing every missing / extra / differently shaped leaf, together with the fields of the
saved WORKDIR/config.json that differ from the current config (e.g. `model.num_classes: checkpoint 3, config 5`).

Reading (for evaluation, prediction, export and fine-tuning): `resolve_checkpoint` finds a step directory (the newest
complete one of a workdir, or an explicit path) and `restore_variables` restores only the model variables ('params',
'frozen_bn') of a saved state (orbax partial restore: the optimizer state is never read). They live here, below the
trainer, the evaluator and the converter, so that each of them imports them downward (tests/test_import_layers.py).

Failure safety:
* `check_workdir` (called by the trainer before compiling) fails with `CheckpointError` naming the path when the
  workdir cannot be created or written, or when its file system has less free space than one checkpoint.
* A failed write (full disk, I/O error), reported by `save` or `wait_until_finished`, raises `CheckpointError` naming
  the step and the newest complete checkpoint; the partial `<step>.orbax-checkpoint-tmp` directory is removed (it is
  never listed nor restored in any case).
* Test hook: with the environment variable DIMASKDINO_TEST_SAVE_DELAY=<seconds>, every save sleeps that long inside
  the temporary directory (before writing the data-iterator item), so a test can kill the process mid-write. Never
  set it outside tests.
"""

import dataclasses
import json
import logging
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from dimaskdino_jax.modeling.model import build_model

log = logging.getLogger(__name__)

CHECKPOINT_DIR = 'checkpoints'
BEST_DIR = 'best'  # WORKDIR/best/STEP: the best checkpoint of the evaluation during training
CONFIG_FILE = 'config.json'
SAVE_DELAY_ENV = 'DIMASKDINO_TEST_SAVE_DELAY'
TMP_SUFFIX = '.orbax-checkpoint-tmp'


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be written (unwritable workdir, full disk, I/O error); the message names the path."""


class CheckpointMismatchError(ValueError):
  """A checkpoint whose tree does not match the current model / optimizer; the message lists the differences."""


class DataStateHandler(ocp.CheckpointHandler):
  """Saves / restores a JSON-able iterator state, one file per process (like grain's CheckpointHandler).

  The stored JSON is {'format': 'json' | 'bytes', 'state': ...}; bytes states (grain DataLoader) are stored as
  UTF-8 text and come back as bytes.
  """

  def save(self, directory: epath.Path, args: 'DataStateSave'):
    delay = float(os.environ.get(SAVE_DELAY_ENV, 0) or 0)
    if delay > 0:  # test hook (module docstring): hold the temporary checkpoint directory open
      time.sleep(delay)
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


def _key_name(k) -> str:
  for attr in ('key', 'idx', 'name'):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _is_leaf_record(x) -> bool:
  return hasattr(x, 'shape') and hasattr(x, 'dtype')


def flat_shapes(tree) -> dict[str, tuple]:
  """'a/b/0/c' -> (shape, dtype name) for every array-like leaf of `tree` (arrays, ShapeDtypeStructs, orbax
  ArrayMetadata). Tuples, named tuples and dicts give the same path for the same position, so a stored tree (orbax
  metadata: dicts and lists) compares with the live one (optax named tuples)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf_record)[0]
  out = {}
  for path, leaf in leaves:
    if not _is_leaf_record(leaf):
      continue
    dtype = leaf.dtype
    name = 'key' if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) else np.dtype(dtype).name
    out['/'.join(_key_name(k) for k in path)] = (tuple(leaf.shape), name)
  return out


def tree_differences(expected, stored, *, prefix: str = '') -> list[str]:
  """Human-readable differences between the tree a restore expects and the one stored (see `flat_shapes`):
  missing leaves, extra leaves and shape differences (dtypes are cast by orbax and not compared; PRNG keys are
  compared by presence only, their stored shape is the raw key data)."""
  want, have = flat_shapes(expected), flat_shapes(stored)
  problems = [f'{prefix}{p}: expected {want[p][0]}, not in the checkpoint' for p in sorted(set(want) - set(have))]
  problems += [f'{prefix}{p}: in the checkpoint {have[p][0]}, not expected' for p in sorted(set(have) - set(want))]
  for p in sorted(set(want) & set(have)):
    if want[p][1] != 'key' and want[p][0] != have[p][0]:
      problems.append(f'{prefix}{p}: checkpoint {have[p][0]} vs expected {want[p][0]}')
  return problems


def _flatten_config(d, prefix=''):
  out = {}
  for k, v in d.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(_flatten_config(v, key + '.'))
    else:
      out[key] = v
  return out


def config_differences(saved: dict | None, config) -> list[str]:
  """'field: checkpoint X, config Y' for every field of the saved config.json that differs from `config`
  (model fields first). saved: the parsed config.json, or None (no differences known)."""
  if not saved or config is None:
    return []
  now = json.loads(config.to_json_best_effort())
  a, b = _flatten_config(saved), _flatten_config(now)
  diffs = []
  for k in sorted(set(a) | set(b), key=lambda k: (not k.startswith('model.'), k)):
    if a.get(k, '<absent>') != b.get(k, '<absent>'):
      diffs.append(f'{k}: checkpoint {a.get(k, "<absent>")!r}, config {b.get(k, "<absent>")!r}')
  return diffs


def read_saved_config(workdir) -> dict | None:
  """The parsed WORKDIR/config.json, or None when absent or unreadable."""
  path = os.path.join(os.fspath(workdir), CONFIG_FILE)
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    if os.path.exists(path):
      log.warning('%s: cannot read the saved config (%s)', path, e)
    return None


def format_problems(problems: list[str], limit: int = 20) -> str:
  shown = '\n  '.join(problems[:limit])
  more = f'\n  ... and {len(problems) - limit} more' if len(problems) > limit else ''
  return f'  {shown}{more}'


def mismatch_message(where, problems: list[str], saved_config: dict | None, config) -> str:
  """The CheckpointMismatchError text: the tree differences, then the config fields that differ."""
  model_problems = [p for p in problems if not p.startswith('opt_state/')]
  shown = model_problems or problems
  msg = (
    f'{where}: the checkpoint does not match the model / optimizer of this config ({len(shown)} differences, '
    f'path: checkpoint shape vs expected):\n{format_problems(shown)}'
  )
  if model_problems and len(problems) > len(model_problems):
    msg += f'\n  (and {len(problems) - len(model_problems)} matching differences in opt_state)'

  diffs = config_differences(saved_config, config)
  if diffs:
    msg += f'\nFields of the saved config.json that differ from this config:\n{format_problems(diffs)}'
  return msg + (
    '\nUse the config (and --config overrides) of the run that wrote the checkpoint, or a new --workdir to start a '
    'new run.'
  )


def state_nbytes(tree) -> int:
  """Bytes of the array leaves of `tree` (arrays or ShapeDtypeStructs): about the size of one checkpoint."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    if _is_leaf_record(leaf) and not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      total += int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


def check_workdir(workdir, needed_bytes: int = 0) -> None:
  """Fails early, with CheckpointError naming the path, when WORKDIR/checkpoints cannot be created or written, or
  when its file system has less than `needed_bytes` free (pass the size of one checkpoint, `state_nbytes`)."""
  directory = os.path.join(os.path.abspath(os.fspath(workdir)), CHECKPOINT_DIR)
  try:
    os.makedirs(directory, exist_ok=True)
    probe = os.path.join(directory, f'.write_probe_{os.getpid()}')
    with open(probe, 'wb') as f:
      f.write(b'\0' * 4096)
      f.flush()
      os.fsync(f.fileno())
    os.remove(probe)
  except OSError as e:
    raise CheckpointError(
      f'{directory}: the checkpoint directory is not writable ({e.strerror or e}); choose another --workdir or fix '
      'its permissions'
    ) from e
  free = shutil.disk_usage(directory).free
  if free < needed_bytes:
    raise CheckpointError(
      f'{directory}: only {free / 2**20:.1f} MiB free, one checkpoint needs about {needed_bytes / 2**20:.1f} MiB; '
      'free some space or choose another --workdir'
    )


class Checkpointer:
  """Saves and restores (state, data iterator state, meta) in WORKDIR/checkpoints, keeping the last K.

  workdir: the run directory. config: the ml_collections config (its `train.keep_checkpoints` is K unless
  `max_to_keep` is given; it is written to WORKDIR/config.json by process 0). async_save: orbax's asynchronous saving.
  subdir: the directory under WORKDIR (BEST_DIR for the best checkpoint of the evaluation during training).
  write_config: False leaves WORKDIR/config.json alone (a second Checkpointer of the same run).
  """

  def __init__(
    self,
    workdir,
    config=None,
    max_to_keep: int | None = None,
    async_save: bool = True,
    subdir: str = CHECKPOINT_DIR,
    write_config: bool = True,
  ):
    self.workdir = os.fspath(workdir)
    self.directory = os.path.join(os.path.abspath(self.workdir), subdir)
    if max_to_keep is None:
      max_to_keep = int(config.train.keep_checkpoints) if config is not None else None
    self.config_name = str(config.get('name', '')) if config is not None else ''
    self.config = config
    self._last_save_step = None
    # The config of the run that wrote the checkpoints here (for mismatch messages); replaced by this run's config
    # only once a checkpoint restored successfully, or right away when there is none.
    self.saved_config = read_saved_config(self.workdir)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    if write_config and config is not None and not self.all_steps():
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
    self._last_save_step = step
    try:
      return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=True))
    except Exception as e:  # any failure leaves an incomplete checkpoint: report it, never restore it
      raise self._save_failed(step, e) from e

  def _save_failed(self, step, error) -> CheckpointError:
    """Removes the temporary directories of failed saves and describes the failure."""
    for name in os.listdir(self.directory) if os.path.isdir(self.directory) else []:
      if TMP_SUFFIX in name:
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
    complete = self.all_steps()
    newest = f'step {complete[-1]} ({self.directory}/{complete[-1]})' if complete else 'none'
    return CheckpointError(
      f'{self.directory}: writing checkpoint {step} failed: {type(error).__name__}: {error}\n'
      f'The incomplete checkpoint was discarded; the newest complete checkpoint is {newest}. Free disk space (or fix '
      'the file system) and rerun the same command to resume from it.'
    )

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
    self.check_compatible(step, abstract_state)
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
    if self.config is not None:
      diffs = config_differences(self.saved_config, self.config)
      if diffs:
        log.warning('%s: resuming with a config that differs from the saved one:\n%s', self.workdir, '\n'.join(diffs))
      self.save_config(self.config)
    return out

  def check_compatible(self, step: int, abstract_state) -> None:
    """Raises CheckpointMismatchError listing every difference between checkpoint `step`'s state tree and
    `abstract_state`, and the config fields that differ from the saved config.json."""
    state_dir = epath.Path(self.directory) / str(int(step)) / 'state'
    stored = ocp.PyTreeCheckpointHandler().metadata(state_dir).tree
    problems = tree_differences(abstract_state, stored)
    if problems:
      raise CheckpointMismatchError(mismatch_message(state_dir, problems, self.saved_config, self.config))

  def restore_latest(self, abstract_state, data_iterator=None) -> dict | None:
    """`restore` of the newest complete checkpoint, or None when there is none."""
    step = self.latest_step()
    if step is None:
      return None
    return self.restore(step, abstract_state, data_iterator=data_iterator)

  def wait_until_finished(self):
    """Blocks until pending asynchronous saves are written (call before exit and before reading them).

    Raises CheckpointError when a pending save failed (its partial directory is removed)."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # an asynchronous save failed: report it, never restore it
      raise self._save_failed(self._last_save_step, e) from e

  def close(self):
    try:
      self.wait_until_finished()
    finally:
      self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ------------------------------------------------------------------------------ reading a checkpoint
def resolve_checkpoint(workdir: str | None = None, checkpoint: str | None = None) -> tuple[str, int]:
  """The step directory to evaluate and its step: the newest complete checkpoint of WORKDIR/checkpoints, or
  `checkpoint`, which may be a step directory (holding 'state'), a checkpoints directory or a workdir (newest step).

  Raises FileNotFoundError naming the directory when there is no checkpoint.
  """
  if (workdir is None) == (checkpoint is None):
    raise ValueError('give exactly one of workdir and checkpoint')
  path = os.path.abspath(os.fspath(checkpoint if checkpoint is not None else workdir))
  if not os.path.isdir(path):
    raise FileNotFoundError(f'{path}: no such directory')
  if checkpoint is not None and os.path.isdir(os.path.join(path, 'state')):
    name = os.path.basename(path)
    if not name.isdigit():
      raise FileNotFoundError(f'{path}: a step directory must be named by its step (like checkpoints/1800)')
    return path, int(name)
  ckpt_dir = os.path.join(path, CHECKPOINT_DIR)
  if workdir is not None or os.path.isdir(ckpt_dir):
    directory = ckpt_dir
  else:
    directory = path  # a checkpoints directory itself
  steps = []
  if os.path.isdir(directory):
    # Complete checkpoints only: orbax writes into '<step>.orbax-checkpoint-tmp-*' and renames when done.
    steps = sorted(
      int(n) for n in os.listdir(directory) if n.isdigit() and os.path.isdir(os.path.join(directory, n, 'state'))
    )
  if not steps:
    raise FileNotFoundError(
      f'{directory}: no checkpoint found (expected step directories like {directory}/1800/state); train first '
      'with train.py --workdir, or pass --checkpoint pointing at a step directory'
    )
  return os.path.join(directory, str(steps[-1])), steps[-1]


def restore_for_cli(config, workdir=None, checkpoint=None):
  """(step_dir, step, variables) of the latest checkpoint in WORKDIR or of CHECKPOINT, for the command-line tools:
  a missing checkpoint or one of another model exits with the error message instead of a traceback."""
  try:
    step_dir, step = resolve_checkpoint(workdir=workdir, checkpoint=checkpoint)
    return step_dir, step, restore_variables(config, step_dir)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f'error: {e}') from None


def restore_variables(config, step_dir: str) -> dict:
  """{'params': ..., 'frozen_bn': ...} of the model of `config`, restored from STEP_DIR/state (partial restore).

  The checkpoint's tree is checked against the model first: a missing or extra variable, or one whose shape
  differs, raises ValueError (CheckpointMismatchError) naming the checkpoint, the differences and the fields of the
  run's saved config.json that differ from `config` (usually a config that does not match the run that wrote it).
  The item is read with orbax's PyTree handler directly: the step-level metadata (`STEP/_CHECKPOINT_METADATA`,
  written by the trainer's CheckpointManager beside the items) is not looked for inside `state/`.
  """
  state_dir = os.path.join(os.path.abspath(step_dir), 'state')
  if not os.path.isdir(state_dir):
    raise FileNotFoundError(f'{state_dir}: not a checkpoint step directory (no state/ item)')
  model = build_model(config)
  size = tuple(int(v) for v in config.data.eval_canvases[0]) if config.data.eval_canvases else (64, 64)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, *size, 3), jnp.uint8))
  shapes = {name: tree for name, tree in shapes.items() if name in ('params', 'frozen_bn')}

  handler = ocp.PyTreeCheckpointHandler()
  stored = handler.metadata(epath.Path(state_dir)).tree
  problems = []
  for name, tree in shapes.items():
    if name not in stored:
      problems.append(f'collection {name!r} missing (the checkpoint has {sorted(stored)})')
      continue
    problems += tree_differences(tree, stored[name], prefix=f'{name}/')
  if problems:
    workdir = os.path.dirname(os.path.dirname(os.path.abspath(step_dir)))
    raise CheckpointMismatchError(mismatch_message(state_dir, problems, read_saved_config(workdir), config))
  abstract = abstract_state(shapes)
  restored = handler.restore(
    epath.Path(state_dir),
    args=ocp.args.PyTreeRestore(
      item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True
    ),
  )
  handler.close()
  return {name: restored[name] for name in shapes}


def restore_stored_variables(step_dir: str) -> dict:
  """{'params': ..., 'frozen_bn': ...} of STEP_DIR/state as stored (its own tree and shapes, host numpy arrays),
  whatever model wrote it: the input of a partial load (convert/init.py). The optimizer state is never read."""
  state_dir = os.path.join(os.path.abspath(step_dir), 'state')
  if not os.path.isdir(state_dir):
    raise FileNotFoundError(f'{state_dir}: not a checkpoint step directory (no state/ item)')
  handler = ocp.PyTreeCheckpointHandler()
  stored = handler.metadata(epath.Path(state_dir)).tree
  wanted = {name: stored[name] for name in ('params', 'frozen_bn') if name in stored}
  if 'params' not in wanted:
    raise FileNotFoundError(f'{state_dir}: holds no params (items {sorted(stored)})')
  abstract = jax.tree.map(
    lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=replicated_sharding()),
    wanted,
    is_leaf=_is_leaf_record,
  )
  restored = handler.restore(
    epath.Path(state_dir),
    args=ocp.args.PyTreeRestore(
      item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True
    ),
  )
  handler.close()
  return jax.tree.map(lambda x: np.asarray(_local_copy(x)), restored)


def _local_copy(x):
  """A replicated array spanning other processes' devices -> this process's copy (host numpy)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_shards[0].data)
  return np.asarray(x)
