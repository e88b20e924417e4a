"""The optimizer of the official `Trainer.build_optimizer` (docs/architecture.md, "Training settings") in optax.

    clip_by_global_norm(optim.clip_norm)              full-model L2 clipping (`clip_grad_norm_(all params)`)
    -> AdamW(b1, b2, eps), decoupled weight decay     torch AdamW: p -= lr_g * (adam + wd_g * p)
       lr_g = schedule(step) x (backbone_multiplier for 'backbone' paths)
       wd_g = weight_decay, 0 for norm parameters and embeddings (biases and level_embed keep it)
       backbone stages frozen by model.backbone.freeze_at: no update at all
    [optax.MultiSteps when optim.grad_accum_steps > 1: the mean gradient of k micro-steps, one update]

The learning rate is an `optax.inject_hyperparams` hyperparameter (the only one: the others are static Python
floats): `learning_rate(opt_state)` reads the base rate of the last update for logging. The schedule counts
optimizer updates (with accumulation: one per k micro-steps). One known difference from torch: optax clips by
max_norm / norm where torch uses max_norm / (norm + 1e-6), a relative difference of 1e-6 / norm.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

# Group labels of `param_labels`.
DECAY = 'decay'
NO_DECAY = 'no_decay'
BACKBONE_DECAY = 'backbone_decay'
BACKBONE_NO_DECAY = 'backbone_no_decay'
FROZEN = 'frozen'  # backbone stages frozen by model.backbone.freeze_at: no update, no decay
LABELS = (DECAY, NO_DECAY, BACKBONE_DECAY, BACKBONE_NO_DECAY, FROZEN)

# Parameter names without weight decay besides norms and embeddings (d2 build_optimizer's Swin exceptions).
_NO_DECAY_NAMES = ('relative_position_bias_table', 'absolute_pos_embed')


def _key_name(k) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_names(path) -> tuple[str, ...]:
  """A jax tree path as a tuple of strings ('backbone', 'res2_0', 'conv1', 'conv', 'kernel')."""
  return tuple(_key_name(k) for k in path)


def is_backbone(names) -> bool:
  """d2: 'backbone' in the module name -> lr x BACKBONE_MULTIPLIER."""
  return any('backbone' in n for n in names[:-1])


def is_no_decay(names) -> bool:
  """Weight decay 0 (WEIGHT_DECAY_NORM = WEIGHT_DECAY_EMBED = 0).

  Norms: Flax LayerNorm / GroupNorm / BatchNorm keep 'scale' and 'bias' directly inside a module whose name contains
  'norm' ('norm1', 'decoder_norm', 'GroupNorm_0', 'enc_output_norm'); any leaf named 'scale' is a norm scale.
  Only the leaf's own module is tested, so a Dense inside a block named like 'ConvNorm_0' keeps its decay.
  Embeddings: nn.Embed's 'embedding' leaf, and anything under 'label_enc'. Biases and 'level_embed' decay.
  """
  leaf = names[-1]
  parent = names[-2].lower() if len(names) > 1 else ''
  if leaf == 'scale' or 'norm' in parent:
    return True
  if leaf == 'embedding' or any('label_enc' in n for n in names):
    return True
  return leaf in _NO_DECAY_NAMES


def is_frozen(names, freeze_at: int) -> bool:
  """detectron2 FREEZE_AT: the stem (freeze_at >= 1) and res2..res{freeze_at} of the backbone get no update.

  The backbone stops their gradients (modeling/backbone.py); without this group AdamW would still decay them.
  Module names: backbone/stem/..., backbone/res{s}_{block}/...
  """
  if freeze_at < 1 or 'backbone' not in names:
    return False
  i = names.index('backbone') + 1
  stage = names[i] if i < len(names) - 1 else ''  # the module right under the backbone
  if stage == 'stem':
    return True
  if stage.startswith('res') and '_' in stage and stage[3 : stage.index('_')].isdigit():
    return int(stage[3 : stage.index('_')]) <= freeze_at
  return False


def param_labels(params, freeze_at: int = 0):
  """The group label of every leaf: 'decay', 'no_decay', 'backbone_decay', 'backbone_no_decay' or 'frozen'."""

  def label(path, _):
    names = path_names(path)
    if is_frozen(names, freeze_at):
      return FROZEN
    decay = not is_no_decay(names)
    if is_backbone(names):
      return BACKBONE_DECAY if decay else BACKBONE_NO_DECAY
    return DECAY if decay else NO_DECAY

  return jax.tree_util.tree_map_with_path(label, params)


def learning_rate_schedule(config) -> optax.Schedule:
  """Base learning rate at an optimizer step: detectron2's LR_SCHEDULER_NAME (WarmupParamScheduler, linear warmup).

  optim.lr_scheduler 'WarmupMultiStepLR' (the official): factor(s) = gamma ** #{m in lr_drop_steps : m <= s}.
  'WarmupCosineLR': factor(s) = end + (1 - end) * (1 + cos(pi * s / T)) / 2, end = optim.lr_end / optim.lr, T the
  number of optimizer updates (train.num_steps / optim.grad_accum_steps), held at `end` after T.
  Either way, during warmup (s < warmup_steps) a linear ramp from warmup_factor * factor(0) at s = 0 to
  factor(warmup_steps) at s = warmup_steps (d2's fixed interval: the schedule is not rescaled after warmup).
  """
  o = config.optim
  base = float(o.lr)
  warmup = int(o.warmup_steps)
  warmup_factor = float(o.warmup_factor)
  if o.lr_scheduler == 'WarmupMultiStepLR':
    gamma = float(o.lr_drop_factor)
    milestones = tuple(sorted(int(m) for m in o.lr_drop_steps))

    def factor_at(step):
      drops = sum((jnp.asarray(step >= m, jnp.float32) for m in milestones), jnp.zeros((), jnp.float32))
      return gamma**drops
  elif o.lr_scheduler == 'WarmupCosineLR':
    end = float(o.lr_end) / base
    updates = max(1, int(config.train.num_steps) // int(o.grad_accum_steps))

    def factor_at(step):
      where = jnp.minimum(jnp.asarray(step, jnp.float32) / updates, 1.0)
      return end + (1.0 - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * where))
  else:
    raise ValueError(f'optim.lr_scheduler: {o.lr_scheduler!r} is not WarmupMultiStepLR or WarmupCosineLR')

  def schedule(step):
    step = jnp.asarray(step)
    factor = factor_at(step)
    if warmup > 0:
      alpha = step.astype(jnp.float32) / warmup
      ramp = warmup_factor * factor_at(0) * (1.0 - alpha) + factor_at(warmup) * alpha
      factor = jnp.where(step < warmup, ramp, factor)
    return base * factor

  return schedule


def _adamw_groups(
  learning_rate, *, b1, b2, eps, weight_decay, backbone_multiplier, labels
) -> optax.GradientTransformation:
  """Global-norm-clipped gradients -> Adam moments -> decoupled decay (masked) -> -lr (x multiplier for backbone)."""
  decay_mask = jax.tree.map(lambda lab: lab in (DECAY, BACKBONE_DECAY), labels)
  backbone_mask = jax.tree.map(lambda lab: lab in (BACKBONE_DECAY, BACKBONE_NO_DECAY), labels)
  frozen_mask = jax.tree.map(lambda lab: lab == FROZEN, labels)
  parts = [
    optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
    optax.add_decayed_weights(weight_decay, mask=decay_mask),
    optax.scale_by_learning_rate(learning_rate),
    optax.masked(optax.scale(backbone_multiplier), backbone_mask),
  ]
  if any(jax.tree.leaves(frozen_mask)):
    parts.append(optax.masked(optax.set_to_zero(), frozen_mask))
  return optax.chain(*parts)


def build_optimizer(config, params) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW with per-group lr / weight decay (docs/architecture.md, "Training settings"),
  MultiSteps if accumulating.

  params: the parameter tree (or its abstract shapes) whose paths define the groups (`param_labels`);
  config.model.backbone.freeze_at (if set) freezes backbone stages.
  """
  o = config.optim
  freeze_at = int(config.get('model', {}).get('backbone', {}).get('freeze_at', 0) or 0)
  labels = param_labels(params, freeze_at=freeze_at)
  opt = optax.inject_hyperparams(
    _adamw_groups, static_args=('b1', 'b2', 'eps', 'weight_decay', 'backbone_multiplier', 'labels')
  )(
    learning_rate=learning_rate_schedule(config),
    b1=float(o.b1),
    b2=float(o.b2),
    eps=float(o.eps),
    weight_decay=float(o.weight_decay),
    backbone_multiplier=float(o.backbone_multiplier),
    labels=labels,
  )
  chain = [opt]
  if o.clip_norm and o.clip_norm > 0:
    chain.insert(0, optax.clip_by_global_norm(float(o.clip_norm)))
  tx = optax.chain(*chain) if len(chain) > 1 else opt
  if int(o.grad_accum_steps) > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=int(o.grad_accum_steps)).gradient_transformation()
  return tx


def learning_rate(opt_state):
  """The base learning rate of the last update (before the backbone multiplier), for logging."""
  hparams = optax.tree_utils.tree_get(opt_state, 'hyperparams')
  if not isinstance(hparams, Mapping) or 'learning_rate' not in hparams:
    raise ValueError('opt_state has no injected learning_rate: was it made by build_optimizer?')
  return hparams['learning_rate']


def group_summary(params) -> dict:
  """{label: (number of leaves, number of scalars)} for logging which parameters land in which group."""
  labels = jax.tree.leaves(param_labels(params))
  sizes = [getattr(x, 'size', 1) for x in jax.tree.leaves(params)]
  out = {}
  for lab, n in zip(labels, sizes):
    c, s = out.get(lab, (0, 0))
    out[lab] = (c + 1, s + int(n))
  return out
