"""Loading and validating ml_collections configs (`configs/NAME.py[:variant]`).

Every config is validated when loaded: impossible combinations fail with a ConfigError naming the file and
the field. `load_config('configs/shapes.py')` or `load_config('configs/dimaskdino_r50_coco.py:24ep')`.
"""

import ast
import importlib.util
import os

import ml_collections

FORMULATIONS = ('official', 'paper')
GUIDANCES = ('decoder0', 'T_i', 'T_s1', 'T_s2', 'Q_bal')
BOX_INITS = ('mask2box', 'bitmask', 'none')
DN_MODES = ('seg', 'none')
MSDA_IMPLS = ('auto', 'xla', 'dense', 'pallas')
DEPTHS = (18, 34, 50, 101)
TRAINABLE = ('all', 'mask_branch')  # train.trainable (training/partition.py)


class ConfigError(ValueError):
  """A config value that cannot work; the message names the file and the field."""


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Imports `path.py` (optionally `path.py:variant`), calls get_config(variant) and validates the result."""
  path, _, variant = spec.partition(':')
  if not os.path.isfile(path):
    raise ConfigError(f'{path}: config file not found')
  module_spec = importlib.util.spec_from_file_location(f'_config_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'{path}: defines no get_config(arg=None)')
  config = module.get_config(variant or None)
  validate(config, source=spec)
  return config


def _require(ok, source, field, message):
  if not ok:
    raise ConfigError(f'{source}: {field}: {message}')


def token_count(canvas_hw, total_levels=4, first_stride=8) -> int:
  """Encoder tokens for a canvas: levels at strides 8, 16, 32 (, 64, ...), each ceil-halved like a conv."""
  h, w = canvas_hw
  h, w = -(-h // first_stride), -(-w // first_stride)
  total = 0
  for _ in range(total_levels):
    total += h * w
    h, w = -(-h // 2), -(-w // 2)
  return total


def validate(config, source='<config>') -> None:
  """Raises ConfigError for any impossible combination: the model's architecture, its selections, BATO, the
  canvases, training, initial weights, the device mesh and the losses, checked in that order."""
  _validate_architecture(config.model, source)
  _validate_selections(config.model, source)
  _validate_bato(config.model, source)
  _require(config.model.dn.num >= 0, source, 'model.dn.num', 'must be >= 0')
  _validate_canvases(config, source)
  _validate_training(config.train, source)
  _validate_initial_weights(config, source)
  _validate_optim(config.optim, source)
  _validate_mesh(config, source)
  _validate_losses(config, source)
  validate_finetuning(config, source)


def _validate_optim(o, source) -> None:
  """optim.grad_accum_steps, the lr scheduler's name and its end value."""
  _require(o.grad_accum_steps >= 1, source, 'optim.grad_accum_steps', 'must be >= 1')
  schedulers = ('WarmupMultiStepLR', 'WarmupCosineLR')
  message = f'unknown {o.lr_scheduler!r}; choose one of {schedulers}'
  _require(o.lr_scheduler in schedulers, source, 'optim.lr_scheduler', message)
  _require(0.0 <= o.lr_end <= o.lr, source, 'optim.lr_end', f'{o.lr_end} must lie in [0, optim.lr = {o.lr}]')


def _validate_architecture(model, source) -> None:
  """model.formulation, msda_impl, classes, backbone, widths, encoder and decoder sizes, box_init, dn.mode."""
  _require(
    model.formulation in FORMULATIONS,
    source,
    'model.formulation',
    f'unknown formulation {model.formulation!r}; choose one of {FORMULATIONS}',
  )
  _require(model.msda_impl in MSDA_IMPLS, source, 'model.msda_impl', f'{model.msda_impl!r} not in {MSDA_IMPLS}')
  _require(model.num_classes >= 1, source, 'model.num_classes', 'must be >= 1')
  backbone = model.backbone
  _require(backbone.depth in DEPTHS, source, 'model.backbone.depth', f'{backbone.depth} not in {DEPTHS}')
  _require(0 <= backbone.freeze_at <= 5, source, 'model.backbone.freeze_at', 'must be in 0..5')
  _require(backbone.dtype in ('float32', 'bfloat16'), source, 'model.backbone.dtype', 'float32 or bfloat16')
  _require(backbone.norm in ('FrozenBN', 'GN'), source, 'model.backbone.norm', "'FrozenBN' or 'GN'")
  _require(0.0 <= model.class_prior_prob < 1.0, source, 'model.class_prior_prob', 'must be in [0, 1)')
  hidden = model.hidden_dim
  _require(hidden % 2 == 0, source, 'model.hidden_dim', 'must be even (sine embeddings)')
  for name in ('encoder', 'decoder'):
    heads = model[name].num_heads
    _require(hidden % heads == 0, source, f'model.{name}.num_heads', f'hidden_dim {hidden} not divisible by {heads}')
  _require(
    hidden % model.encoder.num_groups == 0,
    source,
    'model.encoder.num_groups',
    f'hidden_dim {hidden} not divisible by {model.encoder.num_groups} GroupNorm groups',
  )
  _require(
    list(model.encoder.in_features) == ['res3', 'res4', 'res5'],
    source,
    'model.encoder.in_features',
    'only (res3, res4, res5) is supported',
  )
  _require(
    model.encoder.total_num_feature_levels >= 3, source, 'model.encoder.total_num_feature_levels', 'must be >= 3'
  )
  _require(model.encoder.common_stride == 4, source, 'model.encoder.common_stride', 'only 4 is supported')
  _require(model.decoder.num_layers >= 1, source, 'model.decoder.num_layers', 'must be >= 1')
  _require(model.decoder.box_init in BOX_INITS, source, 'model.decoder.box_init', f'choose one of {BOX_INITS}')
  _require(model.dn.mode in DN_MODES, source, 'model.dn.mode', f'choose one of {DN_MODES}')


def _validate_selections(model, source) -> None:
  """model.di.selection_ks (k1 >= k2 >= ..., the last = num_queries) against DI on / off."""
  selection_ks = tuple(model.di.selection_ks)
  _require(len(selection_ks) >= 1, source, 'model.di.selection_ks', 'needs at least one selection')
  _require(
    selection_ks[-1] == model.decoder.num_queries,
    source,
    'model.di.selection_ks',
    f'the last selection ({selection_ks[-1]}) must equal model.decoder.num_queries ({model.decoder.num_queries})',
  )
  for i in range(1, len(selection_ks)):
    _require(
      selection_ks[i] <= selection_ks[i - 1],
      source,
      'model.di.selection_ks',
      f'k{i + 1} = {selection_ks[i]} > k{i} = {selection_ks[i - 1]}: a selection cannot keep more tokens than it is '
      'given',
    )
  if model.di.enabled:
    _require(len(selection_ks) >= 2, source, 'model.di.selection_ks', 'DI needs two or more selections (k1, k2)')
    _require(model.di.ti_layers >= 1, source, 'model.di.ti_layers', 'DI needs at least one token-interaction layer')
  else:
    _require(
      len(selection_ks) == 1,
      source,
      'model.di.selection_ks',
      'with DI off there is a single selection: set selection_ks = (num_queries,)',
    )


def _validate_bato(model, source) -> None:
  """model.bato: guidance, the decoder layer it runs before, the number of guiding tokens."""
  bato = model.bato
  if not bato.enabled:
    return
  _require(bato.guidance in GUIDANCES, source, 'model.bato.guidance', f'choose one of {GUIDANCES}')
  _require(
    0 <= bato.layer < model.decoder.num_layers,
    source,
    'model.bato.layer',
    f'must be a decoder layer index < {model.decoder.num_layers}',
  )
  _require(
    bato.layer >= 1 or bato.guidance != 'decoder0',
    source,
    'model.bato.layer',
    "guidance 'decoder0' needs bato.layer >= 1",
  )
  _require(
    bato.num_guiding_tokens <= model.decoder.num_queries,
    source,
    'model.bato.num_guiding_tokens',
    f'{bato.num_guiding_tokens} > num_queries {model.decoder.num_queries}',
  )
  if bato.guidance in ('T_s1', 'T_s2', 'Q_bal'):
    _require(model.di.enabled, source, 'model.bato.guidance', f'{bato.guidance!r} needs model.di.enabled')


def _validate_canvases(config, source) -> None:
  """The training and evaluation canvases: divisible by size_divisibility, with at least k1 encoder tokens; the
  data fields that depend on the canvas."""
  model, data = config.model, config.data
  divisor = model.size_divisibility
  k1 = tuple(model.di.selection_ks)[0]
  canvases = [(data.image_size, data.image_size), *[tuple(canvas) for canvas in data.eval_canvases]]
  for field, hw in zip(['data.image_size'] + ['data.eval_canvases'] * len(data.eval_canvases), canvases):
    _require(
      hw[0] % divisor == 0 and hw[1] % divisor == 0,
      source,
      field,
      f'canvas {hw} is not divisible by {divisor} (model.size_divisibility)',
    )
    tokens = token_count(hw, model.encoder.total_num_feature_levels)
    _require(
      k1 <= tokens,
      source,
      'model.di.selection_ks',
      f'k1 = {k1} is larger than the {tokens} encoder tokens of canvas {hw} ({field})',
    )
  _require(data.mask_stride in (1, 2, 4, 8), source, 'data.mask_stride', 'must be 1, 2, 4 or 8')
  _require(data.image_size % data.mask_stride == 0, source, 'data.mask_stride', 'must divide data.image_size')
  _require(data.train_transform in ('lsj', 'resize'), source, 'data.train_transform', "'lsj' or 'resize'")


def _validate_training(train, source) -> None:
  """train: batch size, the step counts of the loop, the trainable subset."""
  _require(train.batch_size >= 1, source, 'train.batch_size', 'must be >= 1')
  for field in ('num_steps', 'log_every', 'checkpoint_every', 'keep_checkpoints', 'max_consecutive_nonfinite'):
    _require(field in train, source, f'train.{field}', 'missing (see configs/dimaskdino_r50_coco.py)')
    _require(
      isinstance(train[field], int) and train[field] >= 1,
      source,
      f'train.{field}',
      f'must be an integer >= 1, got {train[field]!r}',
    )
  trainable = train.get('trainable', 'all')
  _require(trainable in TRAINABLE, source, 'train.trainable', f'{trainable!r}: choose one of {TRAINABLE}')


def _validate_initial_weights(config, source) -> None:
  """model.backbone.weights (ImageNet, FrozenBN only) and train.init_checkpoint exclude each other."""
  backbone = config.model.backbone
  weights = str(backbone.get('weights', '') or '')
  init_checkpoint = str(config.train.get('init_checkpoint', '') or '')
  if not weights:
    return
  _require(
    weights.lower().endswith(('.pth', '.pt', '.pkl')),
    source,
    'model.backbone.weights',
    f'{weights!r}: expected a torchvision ResNet .pth or a detectron2 .pkl',
  )
  _require(
    backbone.norm == 'FrozenBN',
    source,
    'model.backbone.weights',
    "ImageNet weights carry BatchNorm statistics: needs model.backbone.norm = 'FrozenBN'",
  )
  _require(
    not init_checkpoint,
    source,
    'train.init_checkpoint',
    'set either train.init_checkpoint (all weights) or model.backbone.weights (backbone only), not both',
  )


def _validate_mesh(config, source) -> None:
  """mesh (optional): data parallelism only, the batch divisible by the data axis."""
  if 'mesh' not in config:
    return
  mesh = config.mesh
  _require(mesh.model == 1, source, 'mesh.model', 'only 1 is implemented (data parallelism)')
  _require(mesh.data == -1 or mesh.data >= 1, source, 'mesh.data', '-1 (all devices) or >= 1')
  if mesh.data >= 1:
    batch_size = config.train.batch_size
    _require(
      batch_size % mesh.data == 0,
      source,
      'train.batch_size',
      f'{batch_size} is not divisible by mesh.data = {mesh.data} devices',
    )


def _validate_losses(config, source) -> None:
  """loss and matcher point sampling."""
  loss = config.loss
  _require(loss.num_points >= 0, source, 'loss.num_points', 'must be >= 0 (0 = every pixel)')
  _require(config.matcher.num_points >= 0, source, 'matcher.num_points', 'must be >= 0 (0 = every pixel)')
  _require(0.0 <= loss.importance_sample_ratio <= 1.0, source, 'loss.importance_sample_ratio', 'in [0, 1]')
  _require(loss.oversample_ratio >= 1.0, source, 'loss.oversample_ratio', 'must be >= 1')


EVAL_METRIC_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')  # evaluation/coco_eval.py METRIC_NAMES


def validate_finetuning(config, source='<config>') -> None:
  """The fine-tuning and evaluation-during-training fields of config.train (absent fields keep their defaults):
  eval_every, eval_max_images, best_metric, init_strict, init_class_map."""
  t = config.train
  eval_every = t.get('eval_every', 0)
  _require(
    isinstance(eval_every, int) and eval_every >= 0, source, 'train.eval_every', f'an integer >= 0, got {eval_every!r}'
  )
  max_images = t.get('eval_max_images', 0)
  _require(
    isinstance(max_images, int) and max_images >= 0,
    source,
    'train.eval_max_images',
    f'an integer >= 0 (0 = eval.max_images), got {max_images!r}',
  )
  best = str(t.get('best_metric', 'segm/AP'))
  kind, _, name = best.partition('/')
  _require(
    kind in ('bbox', 'segm') and name in EVAL_METRIC_NAMES,
    source,
    'train.best_metric',
    f'{best!r}: expected bbox/NAME or segm/NAME with NAME one of {", ".join(EVAL_METRIC_NAMES)}',
  )
  if eval_every and kind == 'segm':
    _require(
      bool(config.loss.get('mask_losses', True)),
      source,
      'train.best_metric',
      f'{best!r} needs masks, but loss.mask_losses is False: use bbox/{name}',
    )
  _require(isinstance(t.get('init_strict', False), bool), source, 'train.init_strict', 'must be True or False')
  class_map = str(t.get('init_class_map', '') or '')
  if class_map and class_map != 'names':
    entries = [e.strip() for e in class_map.split(',')]
    _require(
      len(entries) == int(config.model.num_classes),
      source,
      'train.init_class_map',
      f'{len(entries)} entries for model.num_classes = {config.model.num_classes}: give one per class (a category '
      "name or id of the checkpoint, or '-' for a new class), or 'names'",
    )
    _require(all(entries), source, 'train.init_class_map', f'{class_map!r} has an empty entry')
  if class_map:
    _require(
      bool(str(t.get('init_checkpoint', '') or '')),
      source,
      'train.init_class_map',
      'maps the classes of train.init_checkpoint, which is not set',
    )


# ------------------------------------------------------------------------------------ command-line overrides
def apply_override(config, dotted: str, raw: str, source: str = '--config') -> None:
  """Sets config.<dotted> from the command-line string `raw`, parsed as a Python literal (strings stay as typed)."""
  keys = dotted.split('.')
  node = config
  for i, key in enumerate(keys[:-1]):
    if key not in node:
      raise ConfigError(f'{source}.{dotted}: no field {".".join(keys[: i + 1])!r} in the config')
    node = node[key]
  last = keys[-1]
  if last not in node:
    raise ConfigError(f'{source}.{dotted}: no field {dotted!r} in the config')
  current = node[last]
  if isinstance(current, str):
    value = raw
  elif isinstance(current, bool):
    if raw.lower() not in ('true', 'false', '1', '0'):
      raise ConfigError(f'{source}.{dotted}={raw}: expected True or False')
    value = raw.lower() in ('true', '1')
  else:
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      if current is not None:
        raise ConfigError(
          f'{source}.{dotted}={raw}: not a Python literal (field is {type(current).__name__})'
        ) from None
      value = raw
  try:
    node[last] = value
  except (TypeError, ValueError) as error:
    raise ConfigError(f'{source}.{dotted}={raw}: {error}') from None


def checkpoint_cli_parser(doc, what):
  """An argparse parser with --config and the mutually exclusive --workdir / --checkpoint of the checkpoint CLIs.

  doc: the tool's module docstring; what: the verb of the --workdir help ('evaluates', 'exports', 'uses').
  """
  import argparse

  parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', required=True, help='configs/NAME.py[:variant]')
  where = parser.add_mutually_exclusive_group(required=True)
  where.add_argument('--workdir', help=f'run directory: {what} its newest checkpoint')
  where.add_argument('--checkpoint', help='a checkpoint step directory (WORKDIR/checkpoints/STEP)')
  return parser


def parse_config_overrides(parser, argv):
  """parser.parse_known_args(argv), then the --config.a.b=value overrides applied to --config, validated.

  Returns (args, config); errors go through parser.error. Shared by eval.py, predict.py and the
  package command-line tools.
  """
  args, rest = parser.parse_known_args(argv)

  overrides = []
  i = 0
  while i < len(rest):
    arg = rest[i]
    if not arg.startswith('--config.'):
      parser.error(f'unrecognized argument {arg!r}')
    name, eq, value = arg[len('--config.') :].partition('=')
    if not eq:
      if i + 1 >= len(rest):
        parser.error(f'{arg} needs a value (--config.a.b=value)')
      value = rest[i + 1]
      i += 1
    overrides.append((name, value))
    i += 1

  try:
    config = load_config(args.config)
    for name, value in overrides:
      apply_override(config, name, value)
    validate(config, source=args.config)
  except ConfigError as error:
    parser.error(str(error))
  return args, config
