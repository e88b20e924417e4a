"""Which parameters a run trains: everything, or only the mask branch (Mask Frozen-DETR mode, config.train.trainable).

    trainable, frozen = split_params(params, mask_branch_predicate)   # two disjoint nested dicts
    params = merge_params(trainable, frozen)                         # the full tree again

Mask Frozen-DETR (the seed paper of DI-MaskDINO's mask design) trains a light mask branch on a frozen detector. Here
`train.trainable = 'mask_branch'` keeps only the modules that turn features into masks trainable:

  pixel_decoder/adapter_1, adapter_1_norm, layer_1, layer_1_norm, mask_features   the 1/4-resolution mask features
  predictor/mask_embed                                                             the 3-layer MLP of the mask head
  predictor/mask_output_conv, mask_output_conv_norm                                BATO's mask-feature update (F')

Everything else (backbone, encoder layers, selection, DI, decoder, class and box heads) is frozen. The train step
differentiates the loss with respect to the trainable subtree only (the frozen subtree is closed over and wrapped in
stop_gradient, so XLA computes no parameter gradients for it), and the optimizer is built on the trainable subtree,
so its state (Adam moments) holds entries for the trainable leaves only.
"""

from collections.abc import Callable, Mapping

import jax

from dimaskdino_jax.training.optimizer import path_names

TRAINABLE_CHOICES = ('all', 'mask_branch')

MASK_BRANCH_MODULES = {
  'pixel_decoder': ('adapter_1', 'adapter_1_norm', 'layer_1', 'layer_1_norm', 'mask_features'),
  'predictor': ('mask_embed', 'mask_output_conv', 'mask_output_conv_norm'),
}


def is_mask_branch(names) -> bool:
  """True for a parameter path (tuple of names) inside one of MASK_BRANCH_MODULES."""
  return len(names) >= 2 and names[1] in MASK_BRANCH_MODULES.get(names[0], ())


def trainable_predicate(config) -> Callable[[tuple], bool] | None:
  """The predicate of config.train.trainable on parameter paths, or None when every parameter trains."""
  choice = str(config.train.get('trainable', 'all'))
  if choice == 'all':
    return None
  if choice == 'mask_branch':
    return is_mask_branch
  raise ValueError(f'train.trainable = {choice!r}: choose one of {TRAINABLE_CHOICES}')


def split_params(params, predicate) -> tuple[dict, dict]:
  """(trainable, frozen): the leaves of the nested dict `params` for which predicate(path names) is True / False.

  Both are nested dicts with the same key paths as `params`, each holding only its own leaves (a module with no leaf
  on one side is left out of that side). predicate None: (params, {}).
  """
  if predicate is None:
    return params, {}

  def walk(node, prefix):
    if not isinstance(node, Mapping):
      return (node, None) if predicate(prefix) else (None, node)
    yes, no = {}, {}
    for key, child in node.items():
      a, b = walk(child, (*prefix, str(key)))
      if a is not None and not (isinstance(a, dict) and not a):
        yes[key] = a
      if b is not None and not (isinstance(b, dict) and not b):
        no[key] = b
    return yes, no

  return walk(params, ())


def merge_params(a, b) -> dict:
  """The union of two nested dicts with disjoint leaves (the inverse of `split_params`)."""
  if not isinstance(b, Mapping) or not b:
    return a
  if not isinstance(a, Mapping) or not a:
    return b
  out = dict(a)
  for key, child in b.items():
    if key in out:
      if not (isinstance(out[key], Mapping) and isinstance(child, Mapping)):
        raise ValueError(f'merge_params: leaf {key!r} is on both sides')
      out[key] = merge_params(out[key], child)
    else:
      out[key] = child
  return out


def trainable_params(config, params):
  """The subtree of `params` that config.train.trainable trains (all of it by default)."""
  return split_params(params, trainable_predicate(config))[0]


def count(tree) -> int:
  """Number of scalars in a tree of arrays (or ShapeDtypeStructs)."""
  return sum(int(getattr(x, 'size', 1)) for x in jax.tree.leaves(tree))


def describe(config, params) -> str:
  """'trainable: N of M parameters (mask branch)' for logging."""
  trainable = trainable_params(config, params)
  return f'trainable: {count(trainable):,} of {count(params):,} parameters ({config.train.get("trainable", "all")})'


def path_predicate_names(params, predicate) -> list[str]:
  """'/'-joined paths of the leaves of `params` selected by predicate (for messages and tests)."""
  return ['/'.join(path_names(p)) for p, _ in jax.tree_util.tree_leaves_with_path(params) if predicate(path_names(p))]
