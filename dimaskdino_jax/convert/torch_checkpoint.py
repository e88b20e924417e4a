"""Official DI-MaskDINO / MaskDINO `.pth` checkpoints and ImageNet ResNets -> our variables
(docs/architecture.md, "Checkpoints").

    sd = read_state_dict('model_final.pth')               # {'model': sd} or a bare state_dict; numpy arrays
    variables = convert_state_dict(sd, config)             # {'params': ..., 'frozen_bn': ...}; strict
    save_variables('runs/converted', config, variables)    # an orbax checkpoint that eval.py / train.py read

The mapping is a table built from our own variable tree (`key_table`): each of our leaves names the official key it
comes from and how its layout changes:

* Linear weight (out, in) -> Dense kernel (in, out); Conv2d weight (O, I, kh, kw) -> (kh, kw, I, O);
* nn.MultiheadAttention `in_proj_weight` (3d, d) / `in_proj_bias` (3d,) -> q/k/v_proj, rows [0:d], [d:2d], [2d:3d];
* LayerNorm / GroupNorm weight -> scale; Embedding weight -> embedding;
* FrozenBN buffers (weight, bias, running_mean, running_var) are kept as they are (collection `frozen_bn`), not
  folded: our FrozenBatchNorm computes the same scale / shift from them;
* MSDeformAttn projections keep their output layouts (see modeling/deformable.py), so they transpose only.

Shared official modules appear under several names in a state_dict (`ALIASES`); the canonical name is read and
every duplicate present must be equal to it. Anything missing, unexpected or mis-shaped stops the conversion with
one `CheckpointError` that lists all of them. torch is imported only to read `.pth` files
(`torch.load(weights_only=True)`: tensors and containers only, no code); `.pkl` files go through a restricted
unpickler (`safe_pickle`).
"""

import dataclasses
import os
import re
from collections.abc import Mapping

import numpy as np

from dimaskdino_jax.convert import safe_pickle
from dimaskdino_jax.training.checkpoint import Checkpointer

PIXEL_DECODER = 'sem_seg_head.pixel_decoder.'
PREDICTOR = 'sem_seg_head.predictor.'
# Keys of official checkpoints that carry no model weights.
IGNORED_KEYS = ('criterion.empty_weight', 'pixel_mean', 'pixel_std')


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not match the model; the message names the file and the keys."""


# ------------------------------------------------------------------------------------------------ reading
def _to_numpy(x):
  if isinstance(x, np.ndarray):
    return x
  if hasattr(x, 'detach'):  # a torch tensor
    x = x.detach().cpu()
    if x.is_floating_point() and x.element_size() < 4:
      x = x.float()  # fp16 / bf16 -> float32 (numpy has no bfloat16)
    return x.numpy()
  return np.asarray(x)


def read_state_dict(path) -> dict[str, np.ndarray]:
  """The state_dict in `path` as numpy arrays: `.pth`/`.pt` via torch.load(weights_only=True), `.pkl` via the
  restricted unpickler. Accepts {'model': state_dict} (detectron2 checkpoints, R-50.pkl) or a bare state_dict;
  non-array entries of the outer dict (optimizer, iteration, ...) are ignored."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointError(f'{path}: no such file')
  ext = os.path.splitext(path)[1].lower()
  if ext in ('.pth', '.pt', '.bin'):
    try:
      import torch
    except ImportError as e:
      raise CheckpointError(
        f'{path}: reading .pth files needs torch; install the optional extra: pip install "dimaskdino-jax[torch]" '
        '(torch==2.13.0, CPU wheel)'
      ) from e
    try:
      obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises UnpicklingError / RuntimeError for unsafe or corrupt files
      raise CheckpointError(f'{path}: torch.load(weights_only=True) refused or failed: {e}') from e
  elif ext == '.pkl':
    try:
      obj = safe_pickle.load(path)
    except safe_pickle.UnsafePickleError as e:
      raise CheckpointError(str(e)) from e
    except Exception as e:
      raise CheckpointError(f'{path}: not a readable pickle: {e}') from e
  else:
    raise CheckpointError(f'{path}: unknown checkpoint format {ext!r}; expected .pth, .pt or .pkl')
  if isinstance(obj, Mapping) and 'model' in obj and isinstance(obj['model'], Mapping):
    obj = obj['model']
  if not isinstance(obj, Mapping):
    raise CheckpointError(f'{path}: expected a state_dict (a dict of tensors) or {{"model": state_dict}}')
  out = {}
  for k, v in obj.items():
    if not isinstance(k, str):
      raise CheckpointError(f'{path}: state_dict key {k!r} is not a string')
    if hasattr(v, 'shape'):
      out[k] = _to_numpy(v)
  if not out:
    raise CheckpointError(f'{path}: the state_dict holds no arrays')
  return out


# ------------------------------------------------------------------------------------------------ the key table
@dataclasses.dataclass(frozen=True)
class Entry:
  """One leaf of our variables and where it comes from.

  collection: 'params' or 'frozen_bn'; path: the leaf's key path in that collection; key: the official key;
  kind: 'copy', 'dense' (transpose), 'conv' (O,I,kh,kw -> kh,kw,I,O), 'qkv' (a third of in_proj, then like
  'dense' for weights); part: 0/1/2 = q/k/v for 'qkv'; shape: our leaf's shape.
  """

  collection: str
  path: tuple
  key: str
  kind: str
  shape: tuple
  part: int = 0

  def torch_shape(self):
    s = self.shape
    if self.kind == 'conv':
      return (s[3], s[2], s[0], s[1])
    if self.kind == 'dense':
      return (s[1], s[0])
    if self.kind == 'qkv':
      return (3 * s[1], s[0]) if len(s) == 2 else (3 * s[0],)
    return s


_BACKBONE_RULES = [
  (r'^stem\.conv\.', 'stem.conv1.'),
  (r'^stem\.norm\.', 'stem.conv1.norm.'),
  (r'^res(\d)_(\d+)\.', r'res\1.\2.'),
  (r'\.(conv\d|shortcut)\.conv\.', r'.\1.'),
]
_PIXEL_DECODER_RULES = [
  (r'^input_proj_(\d+)_conv\.', r'input_proj.\1.0.'),
  (r'^input_proj_(\d+)_norm\.', r'input_proj.\1.1.'),
  (r'^level_embed$', 'transformer.level_embed'),
  (r'^encoder_layers_(\d+)\.', r'transformer.encoder.layers.\1.'),
  (r'\.ffn\.', '.'),
  (r'^(adapter_\d+|layer_\d+)_norm\.', r'\1.norm.'),
]
_PREDICTOR_RULES = [
  (r'^bbox_embed\.', '_bbox_embed.'),
  (r'^ref_point_head\.', 'decoder.ref_point_head.'),
  (r'^decoder_layers_(\d+)\.', r'decoder.layers.\1.'),
  (r'^oldm\.norm\.', 'oldm_norm.'),
  (r'^oldm\.bbox_embed\.', '_oldm_bbox_embed.'),
  (r'^mask_output_conv_norm\.', 'decoder.mask_output_conv.norm.'),
  (r'^mask_output_conv\.', 'decoder.mask_output_conv.'),
  (r'layers_(\d+)\.', r'layers.\1.'),
  (r'\.ffn\.', '.'),
]
_LEAF_NAMES = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight'}
_QKV = re.compile(r'^(.*)\.([qkv])_proj\.(kernel|bias)$')


def _apply(rules, name):
  for pattern, repl in rules:
    name = re.sub(pattern, repl, name)
  return name


def _entry(collection, path, shape):
  """The Entry of one of our leaves, or None when the leaf has no official counterpart."""
  top, rest = path[0], '.'.join(path[1:])
  qkv = _QKV.match(rest)
  if top == 'backbone':
    prefix, rules = 'backbone.', _BACKBONE_RULES
  elif top == 'pixel_decoder':
    prefix, rules = PIXEL_DECODER, _PIXEL_DECODER_RULES
  elif top == 'predictor':
    prefix, rules = PREDICTOR, _PREDICTOR_RULES
  else:
    return None
  if qkv:  # q/k/v projections: one third of torch's in_proj
    module = _apply(rules, qkv.group(1) + '.')
    leaf = 'in_proj_weight' if qkv.group(3) == 'kernel' else 'in_proj_bias'
    return Entry(collection, path, prefix + module + leaf, 'qkv', shape, 'qkv'.index(qkv.group(2)))
  *mods, leaf = rest.split('.')
  name = _apply(rules, '.'.join(mods) + '.' if mods else '') + _LEAF_NAMES.get(leaf, leaf)
  name = _apply(rules, name) if not mods else name  # top-level leaves (level_embed)
  kind = 'copy'
  if leaf == 'kernel':
    kind = 'conv' if len(shape) == 4 else 'dense'
  return Entry(collection, path, prefix + name, kind, tuple(shape))


def _formulation_specific(path):
  names = {'di_residual', 'random_refpoints', 'mask_net', 'box_net'}
  return any(p in names or re.fullmatch(r'oldm_\d+', p) for p in path)


def model_shapes(config) -> dict:
  """{'params': tree, 'frozen_bn': tree} of ShapeDtypeStructs of the model of `config` (no FLOPs)."""
  import jax
  import jax.numpy as jnp

  from dimaskdino_jax.modeling.model import build_model

  model = build_model(config)
  size = tuple(int(v) for v in config.data.eval_canvases[0]) if config.data.eval_canvases else (256, 256)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, *size, 3), jnp.uint8))
  return {name: shapes.get(name, {}) for name in ('params', 'frozen_bn')}


def _leaves(tree, prefix=()):
  for k, v in tree.items():
    if isinstance(v, Mapping):
      yield from _leaves(v, (*prefix, k))
    else:
      yield (*prefix, k), v


def key_table(shapes) -> list[Entry]:
  """One Entry per leaf of `shapes` ({'params': tree, 'frozen_bn': tree}); raises CheckpointError for leaves that
  exist only in our model (the paper formulation, a third selection), which no official checkpoint has."""
  entries, orphans = [], []
  for collection in ('params', 'frozen_bn'):
    for path, leaf in _leaves(shapes.get(collection, {})):
      e = None if _formulation_specific(path) else _entry(collection, path, tuple(leaf.shape))
      if e is None:
        orphans.append(f'{collection}/{"/".join(path)}')
      else:
        entries.append(e)
  if orphans:
    raise CheckpointError(
      'the model of this config has variables no official checkpoint holds (use model.formulation="official" '
      f'and at most two selections): {", ".join(orphans[:8])}' + (' ...' if len(orphans) > 8 else '')
    )
  return entries


def aliases(config) -> dict[str, list[str]]:
  """Canonical key prefix -> the other names the same shared official module has in a state_dict.

  Both models register the shared box MLP per decoder layer (`bbox_embed.{i}`, `decoder.bbox_embed.{i}`) and the
  decoder_norm as `decoder.norm`; DI-MaskDINO also hands class_embed, mask_embed, the DI norm and box MLP and the
  BATO block to its sub-modules.
  """
  m = config.model
  p = PREDICTOR
  layers = range(int(m.decoder.num_layers))
  out = {
    p + 'decoder_norm.': [p + 'decoder.norm.'],
    p + '_bbox_embed.': [p + f'bbox_embed.{i}.' for i in layers] + [p + f'decoder.bbox_embed.{i}.' for i in layers],
  }
  if m.di.enabled or m.bato.enabled:
    out[p + 'class_embed.'] = [p + 'decoder.class_embed.'] + ([p + 'oldm.class_embed.'] if m.di.enabled else [])
    out[p + 'mask_embed.'] = [p + 'decoder.mask_embed.']
  if m.di.enabled:
    ti = range(int(m.di.ti_layers))
    out[p + 'oldm_norm.'] = [p + 'oldm.norm.']
    out[p + '_oldm_bbox_embed.'] = [p + f'oldm_bbox_embed.{i}.' for i in ti] + [p + f'oldm.bbox_embed.{i}.' for i in ti]
  if m.bato.enabled:
    out[p + 'query_guide_feature_update.'] = [p + 'decoder.query_guide_feature_update.']
  return out


# ------------------------------------------------------------------------------------------------ conversion
def _from_torch(e: Entry, x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  if e.kind == 'conv':
    return np.ascontiguousarray(x.transpose(2, 3, 1, 0))
  if e.kind == 'dense':
    return np.ascontiguousarray(x.T)
  if e.kind == 'qkv':
    d = x.shape[0] // 3
    part = x[e.part * d : (e.part + 1) * d]
    return np.ascontiguousarray(part.T) if part.ndim == 2 else part
  return x


def _to_torch(e: Entry, x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  if e.kind == 'conv':
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1))
  if e.kind in ('dense', 'qkv'):
    return np.ascontiguousarray(x.T) if x.ndim == 2 else x
  return x


def _set(tree, path, value):
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def _report(source, missing, unexpected, misshaped, unequal):
  parts = []
  for title, items in (
    ('missing keys', missing),
    ('unexpected keys', unexpected),
    ('mis-shaped keys (checkpoint vs model, torch layout)', misshaped),
    ('shared-module duplicates that differ from their canonical key', unequal),
  ):
    if items:
      shown = '\n    '.join(items[:40]) + (f'\n    ... and {len(items) - 40} more' if len(items) > 40 else '')
      parts.append(f'  {len(items)} {title}:\n    {shown}')
  return (
    f'{source}: the checkpoint does not match the model of this config:\n' + '\n'.join(parts) + '\n'
    'Check that the config matches the checkpoint (DI-MaskDINO: configs/dimaskdino_r50_coco.py, MaskDINO: '
    'configs/maskdino_r50_coco.py; num_classes, decoder layers, feature levels, FFN sizes).'
  )


def convert_state_dict(state_dict, config, source='<state_dict>', shapes=None) -> dict:
  """{'params': ..., 'frozen_bn': ...} (nested dicts of float32 numpy arrays) for the model of `config`.

  Every leaf of the model must be found with its shape, every key of the state_dict must be used (or be a
  duplicate of a shared module equal to its canonical key, or one of IGNORED_KEYS); otherwise CheckpointError
  lists the missing, unexpected and mis-shaped keys. `source` names the file in messages.
  """
  shapes = shapes if shapes is not None else model_shapes(config)
  entries = key_table(shapes)
  used, missing, misshaped = set(), [], []
  out = {'params': {}, 'frozen_bn': {}}
  for e in entries:
    if e.key not in state_dict:
      if e.key not in missing:
        missing.append(e.key)
      continue
    used.add(e.key)
    x = np.asarray(state_dict[e.key])
    if tuple(x.shape) != e.torch_shape():
      item = f'{e.key}: {tuple(x.shape)} vs {e.torch_shape()}'
      if item not in misshaped:
        misshaped.append(item)
      continue
    _set(out[e.collection], e.path, _from_torch(e, x))
  unequal = []
  for canonical, names in aliases(config).items():
    for key in list(state_dict):
      for alias in names:
        if key.startswith(alias):
          twin = canonical + key[len(alias) :]
          if twin in state_dict and twin in used:
            used.add(key)
            a, b = np.asarray(state_dict[key]), np.asarray(state_dict[twin])
            if a.shape != b.shape or not np.array_equal(a, b):
              unequal.append(f'{key} != {twin}')
  unexpected = [
    k
    for k in state_dict
    if k not in used and k not in IGNORED_KEYS and not k.endswith('num_batches_tracked')  # BN step counters
  ]
  if missing or unexpected or misshaped or unequal:
    raise CheckpointError(_report(source, missing, unexpected, misshaped, unequal))
  return out


def to_state_dict(variables, config, with_aliases=True) -> dict[str, np.ndarray]:
  """The inverse: our variables -> an official-layout state_dict of numpy arrays (duplicates of shared modules
  included when `with_aliases`). Used by tests and to hand weights back to the PyTorch code."""
  shapes = {c: variables.get(c, {}) for c in ('params', 'frozen_bn')}
  sd = {}
  parts = {}
  for e in key_table(shapes):
    x = np.asarray(_get(variables[e.collection], e.path))
    if e.kind == 'qkv':
      parts.setdefault(e.key, [None, None, None])[e.part] = _to_torch(e, x)
    else:
      sd[e.key] = _to_torch(e, x)
  for key, (q, k, v) in parts.items():
    sd[key] = np.concatenate([q, k, v], 0)
  if with_aliases:
    for canonical, names in aliases(config).items():
      for key in [k for k in sd if k.startswith(canonical)]:
        for alias in names:
          sd[alias + key[len(canonical) :]] = sd[key]
  return sd


# ------------------------------------------------------------------------------------------------ ImageNet backbones
def _backbone_key(key):
  """A torchvision ResNet key or a detectron2 backbone key -> the detectron2 name without 'backbone.' (or None for
  keys no backbone uses: the classifier `fc`, BN step counters)."""
  if key.startswith('backbone.'):
    key = key[len('backbone.') :]
  if key.endswith('num_batches_tracked') or re.match(r'^(stem\.)?fc\.', key):
    return None
  if key.startswith(('stem.', 'res')):
    return key  # detectron2 naming (R-50.pkl: convert-torchvision-to-d2 output)
  key = re.sub(r'^layer(\d)\.', lambda m: f'res{int(m.group(1)) + 1}.', key)
  key = re.sub(r'^(conv1|bn1)\.', r'stem.\1.', key)
  key = re.sub(r'bn(\d)\.', r'conv\1.norm.', key)
  key = key.replace('downsample.0.', 'shortcut.').replace('downsample.1.', 'shortcut.norm.')
  return key


def convert_backbone(state_dict, config, source='<backbone>', shapes=None) -> dict:
  """{'params': {'backbone': ...}, 'frozen_bn': {'backbone': ...}} from an ImageNet ResNet: a torchvision state_dict
  (`resnet50-*.pth`) or detectron2's `R-50.pkl` ({'model': ...} with stem./res2.. keys). Strict like
  convert_state_dict: every backbone variable must be present and every weight used (the classifier `fc` and BN
  step counters are ignored)."""
  renamed = {}
  for k, v in state_dict.items():
    name = _backbone_key(k)
    if name is not None:
      renamed['backbone.' + name] = v
  shapes = shapes if shapes is not None else model_shapes(config)
  backbone_shapes = {c: {'backbone': t['backbone']} for c, t in shapes.items() if 'backbone' in t}
  if config.model.backbone.norm != 'FrozenBN':
    raise CheckpointError(
      f'{source}: ImageNet weights carry BatchNorm statistics for a FrozenBN backbone; '
      f'config model.backbone.norm is {config.model.backbone.norm!r}'
    )
  return convert_state_dict(renamed, config, source=source, shapes=backbone_shapes)


# ------------------------------------------------------------------------------------------------ writing
def save_variables(out_dir, config, variables, step=0) -> str:
  """Writes `variables` as checkpoint `step` of the workdir OUT_DIR (OUT_DIR/checkpoints/STEP/state, plus
  OUT_DIR/config.json), the layout eval.py (--workdir / --checkpoint) and train.py (train.init_checkpoint) read.
  Returns the step directory."""
  import jax.numpy as jnp

  state = {
    'step': jnp.asarray(step, jnp.int32),
    'params': variables['params'],
    'frozen_bn': variables.get('frozen_bn', {}),
  }
  ckpt = Checkpointer(out_dir, config, max_to_keep=None, async_save=False)
  if step in ckpt.all_steps():
    ckpt.close()
    raise CheckpointError(f'{ckpt.directory}/{step}: a checkpoint already exists there; choose another --out')
  ckpt.save(step, state)
  ckpt.close()
  return os.path.join(ckpt.directory, str(step))
