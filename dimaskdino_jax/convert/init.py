"""Initial weights for a fresh training run: a converted / earlier checkpoint (fine-tuning) or an ImageNet backbone.

* `config.train.init_checkpoint`: a workdir, checkpoints directory or step directory (e.g. the OUT of
  `python -m dimaskdino_jax.convert`). Every model variable ('params', 'frozen_bn') whose path and shape fit the
  model of the config is loaded; the others keep the fresh model's initialization (the state this run would start
  from without a checkpoint) and are listed once, at start, by path with both shapes, together with the paths the
  checkpoint lacks (missing) and those the model does not have (unexpected). `train.init_strict=True` instead stops
  at any difference (CheckpointMismatchError, the behaviour before partial loading). The optimizer starts fresh at
  step 0.
* `config.train.init_class_map`: rows of the checkpoint's class heads kept for this model's classes (`CLASS_AXES`:
  the class_embed kernel columns and bias, the denoising label embedding rows). 'names' matches the category names
  of this run's training split to the checkpoint's; else one comma-separated entry per class of this model: the
  checkpoint's category name or id, or '-' for a new class (its row keeps the fresh initialization). The checkpoint's
  categories come from the prepared split named by its run's config.json, or, for an 80-class checkpoint whose
  dataset is not prepared here (a converted official one), from COCO 2017 (convert/coco_categories.py).
* `config.model.backbone.weights`: a torchvision ResNet `.pth` or detectron2 `R-50.pkl`; only the backbone is
  replaced (FrozenBN statistics included), the rest keeps its random initialization.

Both apply only when the run starts from scratch: resuming from WORKDIR's own checkpoints ignores them.
`check_initial_weights` checks the checkpoint and the class map before anything compiles (the trainer calls it).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from dimaskdino_jax.config import ConfigError
from dimaskdino_jax.convert.coco_categories import COCO_CATEGORIES
from dimaskdino_jax.training.checkpoint import (
  CheckpointMismatchError,
  flat_shapes,
  read_saved_config,
  resolve_checkpoint,
  restore_stored_variables,
  restore_variables,
)

# Parameters with one entry per class, and the axis that indexes the class (paths under 'params/').
CLASS_AXES = {
  'predictor/class_embed/kernel': 1,  # (D, C)
  'predictor/class_embed/bias': 0,  # (C,)
  'predictor/label_enc/embedding': 0,  # (C, D) denoising label embedding
}
NEW_CLASS = '-'


class InitError(ConfigError):
  """train.init_checkpoint / train.init_class_map that cannot be used; the message names the field."""


def _like(new, old):
  """`new` (numpy tree) with the dtypes (and shardings, when placed) of `old`."""

  def one(n, o):
    x = jnp.asarray(n, dtype=o.dtype)
    sharding = getattr(o, 'sharding', None)
    return jax.device_put(x, sharding) if sharding is not None else x

  return jax.tree.map(one, new, old)


# ------------------------------------------------------------------------------------------------ class maps
def checkpoint_categories(step_dir: str, num_classes: int) -> tuple[list[int], list[str], str]:
  """(category ids, names, where they came from) of the classes of the checkpoint in STEP_DIR, in label order."""
  workdir = os.path.dirname(os.path.dirname(os.path.abspath(step_dir)))
  saved = read_saved_config(workdir)
  data = (saved or {}).get('data', {})
  if data.get('name'):
    from dimaskdino_jax.data.tfds_builder import PreparedDataset, is_prepared

    split = data.get('train_split', 'train')
    data_dir = data.get('data_dir', 'data')
    if not os.path.isabs(data_dir) and not os.path.isdir(data_dir):
      data_dir = os.path.join(workdir, data_dir)
    if is_prepared(data_dir, data['name'], split):
      prepared = PreparedDataset(data_dir, data['name'], split)
      if prepared.num_classes == num_classes:
        ids = [int(c) for c in prepared.label_to_category_id]
        return ids, list(prepared.category_names), f"{prepared.path} (its run's data.name)"
  if num_classes == len(COCO_CATEGORIES):
    return [i for i, _ in COCO_CATEGORIES], [n for _, n in COCO_CATEGORIES], 'COCO 2017 (80 classes)'
  raise InitError(
    f"train.init_class_map: cannot tell the class names of {step_dir} ({num_classes} classes): its run's "
    f'config.json names no prepared dataset with {num_classes} categories here, and it is not an 80-class COCO '
    'checkpoint. Prepare that dataset, or leave train.init_class_map empty to re-initialize the class heads'
  )


def target_categories(config) -> list[str]:
  """Category names of this run's training split (label order)."""
  from dimaskdino_jax.data.tfds_builder import load_prepared

  try:
    return list(load_prepared(config, config.data.train_split).category_names)
  except (FileNotFoundError, ValueError) as e:
    raise InitError(f"train.init_class_map='names' needs this run's category names: {e}") from None


def resolve_class_map(config, step_dir: str, num_source: int) -> tuple[np.ndarray, list[str]] | None:
  """train.init_class_map -> (source label per class of this model, -1 for a new class; one line per class for the
  summary), or None when no map is set. Raises InitError naming the field and the unknown class."""
  spec = str(config.train.get('init_class_map', '') or '').strip()
  if not spec:
    return None
  ids, names, origin = checkpoint_categories(step_dir, num_source)
  by_name = {n.lower(): i for i, n in enumerate(names)}
  by_id = {c: i for i, c in enumerate(ids)}
  if spec == 'names':
    targets = target_categories(config)
    index = [by_name.get(n.lower(), -1) for n in targets]
    if all(i < 0 for i in index):
      raise InitError(
        f"train.init_class_map='names': none of this dataset's categories ({', '.join(targets)}) is a category of "
        f'{step_dir} ({origin}: {", ".join(names[:10])}{", ..." if len(names) > 10 else ""})'
      )
    entries = targets
  else:
    entries = [e.strip() for e in spec.split(',')]
    index = []
    for entry in entries:
      if entry == NEW_CLASS:
        index.append(-1)
      elif entry.isdigit():
        if int(entry) not in by_id:
          raise InitError(f'train.init_class_map: category id {entry} is not a category of {step_dir} ({origin})')
        index.append(by_id[int(entry)])
      elif entry.lower() in by_name:
        index.append(by_name[entry.lower()])
      else:
        raise InitError(
          f'train.init_class_map: {entry!r} is not a category of {step_dir} ({origin}: '
          f'{", ".join(names[:10])}{", ..." if len(names) > 10 else ""})'
        )
  lines = [
    f'class {c} ({entry}) <- {names[i]!r} (id {ids[i]})' if i >= 0 else f'class {c} ({entry}) <- new'
    for c, (entry, i) in enumerate(zip(entries, index))
  ]
  return np.asarray(index, np.int64), lines


def map_class_rows(fresh, stored, source_index: np.ndarray, axis: int):
  """`fresh` with the slices `stored[source_index[c]]` (along `axis`) for every class c with source_index[c] >= 0."""
  out = np.array(fresh)
  keep = np.flatnonzero(source_index >= 0)
  taken = np.take(np.asarray(stored), source_index[keep], axis=axis)
  index = [slice(None)] * out.ndim
  index[axis] = keep
  out[tuple(index)] = taken
  return out


# ------------------------------------------------------------------------------------------------ partial load
def _flat(tree):
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): leaf for path, leaf in leaves}


def merge_variables(fresh: dict, stored: dict, class_map=None) -> tuple[dict, dict]:
  """Fresh variables ({'params', 'frozen_bn'}) with every stored leaf of the same path and shape; class-head leaves
  (CLASS_AXES) through `class_map` (source label per class, -1 = keep fresh) when it is given.

  Returns (variables as numpy, report): report = {'loaded': n, 'mapped': [path], 'reinitialized': [(path, stored
  shape, expected shape)], 'missing': [(path, shape)], 'unexpected': [(path, shape)]}.
  """
  report = {'loaded': 0, 'mapped': [], 'reinitialized': [], 'missing': [], 'unexpected': []}
  out = {}
  for collection, tree in fresh.items():
    have = _flat(stored.get(collection, {}))
    want = _flat(tree)
    merged = {}
    for path, leaf in want.items():
      full = f'{collection}/{path}'
      if path not in have:
        report['missing'].append((full, tuple(np.shape(leaf))))
        merged[path] = np.asarray(leaf)
        continue
      old = np.asarray(have[path])
      axis = CLASS_AXES.get(path) if collection == 'params' else None
      if class_map is not None and axis is not None:
        merged[path] = map_class_rows(leaf, old, class_map, axis)
        report['mapped'].append(full)
      elif old.shape == tuple(np.shape(leaf)):
        merged[path] = old
        report['loaded'] += 1
      else:
        report['reinitialized'].append((full, old.shape, tuple(np.shape(leaf))))
        merged[path] = np.asarray(leaf)
    report['unexpected'] += [(f'{collection}/{p}', tuple(np.shape(have[p]))) for p in sorted(set(have) - set(want))]
    treedef = jax.tree_util.tree_structure(tree)
    out[collection] = jax.tree_util.tree_unflatten(treedef, [merged[p] for p in want])
  return out, report


def format_report(step_dir: str, report: dict, class_lines=None) -> str:
  """The one summary printed at start: what was loaded, mapped, re-initialized, missing and unexpected."""
  lines = [
    f'initialized from {step_dir}: {report["loaded"]} variables loaded, {len(report["mapped"])} class heads mapped, '
    f'{len(report["reinitialized"])} re-initialized, {len(report["missing"])} missing, '
    f'{len(report["unexpected"])} unexpected'
  ]
  if report['mapped']:
    lines.append('  class heads mapped (checkpoint class -> class of this model): ' + ', '.join(report['mapped']))
    lines += [f'    {line}' for line in class_lines or []]
  if report['reinitialized']:
    lines.append('  re-initialized (path: checkpoint shape vs this model):')
    lines += [f'    {p}: {a} vs {b}' for p, a, b in report['reinitialized']]
  if report['missing']:
    lines.append('  missing in the checkpoint (fresh initialization):')
    lines += [f'    {p}: {s}' for p, s in report['missing']]
  if report['unexpected']:
    lines.append('  in the checkpoint but not in this model (ignored):')
    lines += [f'    {p}: {s}' for p, s in report['unexpected']]
  return '\n'.join(lines)


def check_initial_weights(config) -> str | None:
  """Resolves train.init_checkpoint and train.init_class_map before anything compiles; returns the step directory
  (None without an init checkpoint). Raises InitError naming the field when it is not a checkpoint or a class of the
  map is unknown."""
  init_ckpt = str(config.train.get('init_checkpoint', '') or '')
  if not init_ckpt:
    return None
  try:
    step_dir, _ = resolve_checkpoint(checkpoint=init_ckpt)
  except (FileNotFoundError, ValueError) as e:
    raise InitError(f'train.init_checkpoint={init_ckpt!r} is not a checkpoint: {e}') from None
  if str(config.train.get('init_class_map', '') or ''):
    resolve_class_map(config, step_dir, _stored_num_classes(step_dir))
  return step_dir


def _stored_num_classes(step_dir: str) -> int:
  import orbax.checkpoint as ocp
  from etils import epath

  stored = flat_shapes(ocp.PyTreeCheckpointHandler().metadata(epath.Path(step_dir) / 'state').tree)
  path = 'params/predictor/class_embed/bias'
  if path not in stored:
    raise InitError(f'train.init_class_map: {step_dir} has no {path} (no class head to map)')
  return int(stored[path][0][0])


def load_initial_weights(config, state, verbose=True):
  """`state` ({'params', 'frozen_bn', ...}) with the initial weights the config asks for (or unchanged)."""
  init_ckpt = str(config.train.get('init_checkpoint', '') or '')
  weights = str(config.model.backbone.get('weights', '') or '')
  if init_ckpt:
    step_dir = check_initial_weights(config)
    fresh = {'params': state['params'], 'frozen_bn': state['frozen_bn']}
    if bool(config.train.get('init_strict', False)):
      variables = restore_variables(config, step_dir)
      summary = f'initialized all model weights from {step_dir}'
    else:
      stored = restore_stored_variables(step_dir)
      class_map = resolve_class_map(config, step_dir, _stored_num_classes(step_dir))
      index, class_lines = class_map if class_map is not None else (None, None)
      host_fresh = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), fresh)
      variables, report = merge_variables(host_fresh, stored, index)
      summary = format_report(step_dir, report, class_lines)
      if not report['loaded'] and not report['mapped']:
        raise CheckpointMismatchError(f'{step_dir}: no variable of the checkpoint fits this model\n{summary}')
    state = {
      **state,
      'params': _like(variables['params'], state['params']),
      'frozen_bn': _like(variables.get('frozen_bn', {}), state['frozen_bn']),
    }
    if verbose and jax.process_index() == 0:
      print(summary, flush=True)
  elif weights:
    from dimaskdino_jax.convert.torch_checkpoint import convert_backbone, read_state_dict

    shapes = {
      'params': {'backbone': state['params']['backbone']},
      'frozen_bn': {'backbone': state['frozen_bn'].get('backbone', {})},
    }
    backbone = convert_backbone(read_state_dict(weights), config, source=weights, shapes=shapes)
    params = {**state['params'], 'backbone': _like(backbone['params']['backbone'], state['params']['backbone'])}
    frozen = dict(state['frozen_bn'])
    frozen['backbone'] = _like(backbone['frozen_bn']['backbone'], state['frozen_bn']['backbone'])
    state = {**state, 'params': params, 'frozen_bn': frozen}
    if verbose:
      print(f'initialized the backbone from {weights}', flush=True)
  return state
