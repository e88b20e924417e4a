"""The training losses of DI-MaskDINO (`SetCriterion`, docs/architecture.md, "Losses" and "Denoising queries").

`compute_losses(predictions, targets, rng, config)` matches every supervised set of predictions to the GT (all
matchings of the step in one host callback, see matcher.py), computes the named loss terms of the official code
and their weighted sum. Everything has static shapes and is jit- and grad-able.

Terms (each normalized by num_masks = number of valid GT in the batch, clamped >= 1):
  loss_ce    sigmoid focal loss (alpha, gamma) over all queries x classes, unmatched queries all-zero targets.
             The official `sigmoid_focal_loss(...).mean(1).sum() / num_masks * n_queries` is exactly this sum.
  loss_bbox  L1 on cxcywh over matched pairs.
  loss_giou  1 - GIoU over matched pairs.
  loss_mask  per matched pair, mean sigmoid BCE over importance-sampled points.
  loss_dice  per matched pair, 1 - (2 sum(s t) + 1) / (sum(s) + sum(t) + 1) over the same points.
             Taken in a loop over the stacked layers (`looped_mask_loss_sums`: lax.scan, rematerialized body), so
             the points and sampled logits of one layer's sets exist at a time, not those of all sets of the step.
             With `loss.num_points = 0` both are taken at every pixel of the predicted mask map instead (the GT
             sampled once at those pixel centres): not the official recipe, a cheaper one for small mask maps.
Copies: no suffix (final layer), `_{i}` (aux i; i = 0 is the initial prediction), `_interm` (encoder selection),
`_dn` / `_dn_{i}` (denoising, fixed assignment, normalized by num_masks * num_groups), `oldm_<term>_{i}` (DI
token-interaction layer i, class + box only; with three or more selections, the layers of the later stages in
`predictions.di_aux_more` continue the index i). The total is sum(weight * term) with the same weight for every
copy: class_weight, box_weight, giou_weight (all x detection_weight_scale), mask_weight, dice_weight.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from dimaskdino_jax import box_ops
from dimaskdino_jax.losses import matcher, point_sampling
from dimaskdino_jax.losses.point_sampling import (
  pixel_centers,
  point_sample,
  point_sample_no_grad,
  point_sample_rows,
  uncertain_point_coords,
)
from dimaskdino_jax.modeling.outputs import HeadOutputs, mask_logits

BOX_TERMS = ('loss_ce', 'loss_bbox', 'loss_giou')
# `uniform` value that selects the mask losses at every pixel (loss.num_points = 0), see `mask_loss_sums`.
DENSE = 'dense'
MASK_TERMS = ('loss_mask', 'loss_dice')
# A harmless box for padded / unmatched GT so that GIoU and its gradient stay finite where the weight is 0.
_DUMMY_BOX = (0.5, 0.5, 1.0, 1.0)


def bce_with_logits(x, t):
  """Elementwise binary cross-entropy with logits (torch `binary_cross_entropy_with_logits`), stable."""
  return jnp.maximum(x, 0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))


def sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0):
  """Elementwise sigmoid focal loss (RetinaNet), logits and targets of the same shape -> same shape."""
  x = logits.astype(jnp.float32)
  t = targets.astype(jnp.float32)
  p = jax.nn.sigmoid(x)
  p_t = p * t + (1 - p) * (1 - t)
  loss = bce_with_logits(x, t) * (1 - p_t) ** gamma
  if alpha >= 0:
    loss = (alpha * t + (1 - alpha) * (1 - t)) * loss
  return loss


def sigmoid_ce_loss(point_logits, point_labels):
  """Mean BCE over points: (..., P) x (..., P) -> (...)."""
  return jnp.mean(bce_with_logits(point_logits.astype(jnp.float32), point_labels.astype(jnp.float32)), axis=-1)


def dice_loss(point_logits, point_labels):
  """Dice loss per mask, 1 - (2 sum(s t) + 1) / (sum(s) + sum(t) + 1), s = sigmoid: (..., P) -> (...)."""
  s = jax.nn.sigmoid(point_logits.astype(jnp.float32))
  t = point_labels.astype(jnp.float32)
  return 1 - (2 * jnp.sum(s * t, -1) + 1) / (jnp.sum(s, -1) + jnp.sum(t, -1) + 1)


def box_loss_sums(pred_boxes, gt_boxes, weights):
  """Weighted sums of L1 and 1 - GIoU over pairs: boxes (..., 4) cxcywh, weights (...) -> (l1, giou)."""
  w = weights.astype(jnp.float32)
  pred = pred_boxes.astype(jnp.float32)
  gt = jnp.where(w[..., None] > 0, gt_boxes.astype(jnp.float32), jnp.asarray(_DUMMY_BOX, jnp.float32))
  l1 = jnp.sum(jnp.abs(pred - gt) * w[..., None])
  giou = box_ops.elementwise_generalized_box_iou(box_ops.box_cxcywh_to_xyxy(pred), box_ops.box_cxcywh_to_xyxy(gt))
  return l1, jnp.sum((1 - giou) * w)


def mask_loss_sums_at_points(pred_masks, gt_masks, points, weights):
  """Weighted sums of the BCE and dice mask losses at given points.

  pred_masks (N, Hm, Wm) logits, gt_masks (N, Hg, Wg) binary, points (N, P, 2) (x, y) in [0, 1], weights (N,).
  """
  point_logits = point_sample_rows(pred_masks.astype(jnp.float32), points)  # (N, P)
  point_labels = point_sample_no_grad(gt_masks, points)  # (N, P): the GT takes no gradient
  w = weights.astype(jnp.float32)
  return jnp.sum(sigmoid_ce_loss(point_logits, point_labels) * w), jnp.sum(dice_loss(point_logits, point_labels) * w)


def mask_loss_sums(pred_masks, gt_masks, weights, uniform, loss_cfg):
  """Mask losses with PointRend importance-sampled points (no gradient through the point selection).

  pred_masks (..., Hm, Wm), gt_masks (..., Hg, Wg), weights (...): one pair per leading index.
  uniform: (..., num_uniform_draws, 2) uniform values in [0, 1) for the point sampling of each pair; or DENSE:
  the losses at every pixel of the predicted map, gt_masks then (..., Hm * Wm) (see `gt_at_pixel_centers`).
  """
  if isinstance(uniform, str):
    if uniform != DENSE:
      raise ValueError(f'mask_loss_sums: uniform must be an array or {DENSE!r}, got {uniform!r}')
    logits = pred_masks.reshape(-1, pred_masks.shape[-2] * pred_masks.shape[-1]).astype(jnp.float32)
    labels = gt_masks.reshape(logits.shape).astype(jnp.float32)
    w = weights.reshape(-1).astype(jnp.float32)
    return jnp.sum(sigmoid_ce_loss(logits, labels) * w), jnp.sum(dice_loss(logits, labels) * w)
  pred = pred_masks.reshape(-1, *pred_masks.shape[-2:])
  gt = gt_masks.reshape(-1, *gt_masks.shape[-2:])
  points = uncertain_point_coords(
    pred,
    None,
    int(loss_cfg.num_points),
    float(loss_cfg.oversample_ratio),
    float(loss_cfg.importance_sample_ratio),
    uniform=uniform.reshape(-1, *uniform.shape[-2:]),
  )
  points = checkpoint_name(points, LOSS_POINTS)  # (N, num_points, 2): what `looped_mask_loss_sums` may keep
  return mask_loss_sums_at_points(pred, gt, points, weights.reshape(-1))


class EmbeddedMasks(NamedTuple):
  """L stacked sets of masks given by their factors (modeling.outputs.MaskFactors): masks[l, b, q] =
  embeds[l, b, q] . maps[feature_index[l], b] over d, the maps given to `looped_mask_loss_sums` as mask_features.

  embeds: (L, B, Q, d); feature_index: (L,) int32.
  """

  embeds: Any
  feature_index: Any


class MaskPairs(NamedTuple):
  """The (prediction, GT) pairs of L stacked prediction sets that get the point-sampled mask losses.

  masks:  (L, B, Q, Hm, Wm) mask logits, or EmbeddedMasks: then only the masks of the pairs' queries are formed
          (the backward pass runs over those, not over all Q).
  query:  (L, B, P) int32 in [0, Q): the predicted mask of each pair; None when pair p is query p (P = Q).
  gt:     (L, B, P) int32 in [0, G): the GT mask of each pair; None when pair p is GT p (P = G).
  weight: (L, B, P): 1 for pairs with a loss, 0 for the others (their loss is computed and multiplied by 0).
  """

  masks: Any
  query: Any
  gt: Any
  weight: Any


def loss_point_uniforms(key, index, num_maps, loss_cfg):
  """The uniform values of the importance sampling at loop step `index` of `looped_mask_loss_sums`:
  (num_maps, num_uniform_draws, 2), the maps of every MaskPairs of the step in order, image-major within each."""
  shape = (num_maps, num_uniform_draws(loss_cfg), 2)
  return point_sampling.hashed_uniform(jax.random.fold_in(key, index), shape)


# The name of the selected loss points inside `looped_mask_loss_sums`' rematerialized body.
LOSS_POINTS = 'loss_points'


def looped_mask_loss_sums(pairs, gt_masks, key, loss_cfg, mask_features=None):
  """Point-sampled mask losses (as `mask_loss_sums`) of stacked prediction sets, one stack entry at a time.

  pairs: sequence of MaskPairs with the same L; gt_masks (B, G, Hg, Wg) binary; key: PRNG key of the points;
  mask_features: (F, B, Hm, Wm, d) the maps of pairs whose masks are EmbeddedMasks (else None).
  Returns a list like `pairs` of (bce (L,), dice (L,)) weighted sums.

  A `lax.scan` over the L entries with a rematerialized (`jax.checkpoint`) body: the uniform draws, the candidate
  taps of the importance sampling and the sampled logits exist for one entry at a time, in the forward and again
  in the backward pass (recomputed from the same key), instead of for all sets of the step at once. Step l draws
  its uniforms with `loss_point_uniforms(key, l, ...)`, so the losses equal `mask_loss_sums` given those values.

  Only the selected points (L, pairs, num_points, 2) are kept from the forward to the backward, unless
  `loss.recompute_points` is true: the backward then selects them again, XLA:CPU's `top_k` over the oversampled
  candidates a second time (measured on the R50 step at batch 2: 4.1 s of ~61 s; BENCHMARKS.md). The same points
  either way, so the same losses and gradients; keeping them costs num_points * 8 bytes per pair and layer.
  """
  pairs = tuple(pairs)
  n_steps = {jax.tree.leaves(p.masks)[0].shape[0] for p in pairs}
  if len(n_steps) != 1:
    raise ValueError(f'looped_mask_loss_sums: the MaskPairs must share their leading size, got {sorted(n_steps)}')

  def body(carry, xs):
    index, step_pairs = xs
    preds, gts, weights = [], [], []
    for masks, query, gt, weight in step_pairs:
      if isinstance(masks, EmbeddedMasks):
        embeds = masks.embeds  # (B, Q, d)
        if query is not None:
          embeds = jnp.take_along_axis(embeds, query[..., None], axis=1)  # (B, P, d)
        masks = mask_logits(embeds, mask_features[masks.feature_index])  # (B, P, Hm, Wm)
      elif query is not None:
        masks = jnp.take_along_axis(masks, query[..., None, None], axis=1)  # (B, P, Hm, Wm)
      gt_maps = gt_masks if gt is None else jnp.take_along_axis(gt_masks, gt[..., None, None], axis=1)
      preds.append(masks.reshape(-1, *masks.shape[-2:]))
      gts.append(gt_maps.reshape(-1, *gt_maps.shape[-2:]))
      weights.append(weight.reshape(-1))
    uniform = loss_point_uniforms(key, index, sum(p.shape[0] for p in preds), loss_cfg)
    out, start = [], 0
    for pred, gt_maps, weight in zip(preds, gts, weights):
      n = pred.shape[0]
      out.append(mask_loss_sums(pred, gt_maps, weight, uniform[start : start + n], loss_cfg))
      start += n
    return carry, out

  xs = (jnp.arange(n_steps.pop(), dtype=jnp.int32), pairs)
  keep = not loss_cfg.get('recompute_points', False)
  policy = jax.checkpoint_policies.save_only_these_names(LOSS_POINTS) if keep else None
  _, out = jax.lax.scan(jax.checkpoint(body, prevent_cse=False, policy=policy), None, xs)
  return out


def gt_at_pixel_centers(gt_masks, hm, wm):
  """GT masks (B, G, Hg, Wg) sampled at the pixel centres of an (hm, wm) map -> (B, G, hm * wm) float32.

  Exactly the labels that point-sampled losses would read at those points (bilinear, as `point_sample`).
  """
  return point_sample(gt_masks, pixel_centers(hm, wm))


def num_uniform_draws(loss_cfg):
  """Uniform (x, y) draws per mask pair for the loss point sampling."""
  return point_sampling.num_uniform_draws(
    int(loss_cfg.num_points), float(loss_cfg.oversample_ratio), float(loss_cfg.importance_sample_ratio)
  )


def _labels_one_hot(labels, num_classes):
  """labels (...) int, -1 = background -> (..., C) float32 (all zeros for background)."""
  return (labels[..., None] == jnp.arange(num_classes)).astype(jnp.float32)


def matched_loss_sums(head, targets, query_for_gt, loss_cfg, uniform=None):
  """Unnormalized loss sums of one set of predictions under a Hungarian matching.

  head: HeadOutputs (B, Q, ...); query_for_gt (B, G) int32 (-1 = no query); uniform: (B, G, D, 2) uniform
  values for the mask losses' point sampling (D = num_uniform_draws), DENSE for the losses at every pixel (then
  targets['mask_points'] (B, G, Hm * Wm) holds the GT at the pixel centres), or None for no mask losses.
  Returns a dict of scalars: loss_ce, loss_bbox, loss_giou and, with masks, loss_mask, loss_dice.
  """
  b, q, c = head.logits.shape
  matched = query_for_gt >= 0  # (B, G)
  q_idx = jnp.clip(query_for_gt, 0, q - 1)
  labels = jnp.where(targets['valid'], targets['labels'], -1)
  gt_of_query = matcher.gt_for_queries(query_for_gt, q)  # (B, Q)
  query_labels = jnp.where(gt_of_query >= 0, jnp.take_along_axis(labels, jnp.maximum(gt_of_query, 0), axis=1), -1)
  focal = sigmoid_focal_loss(head.logits, _labels_one_hot(query_labels, c), loss_cfg.focal_alpha, loss_cfg.focal_gamma)
  out = {'loss_ce': jnp.sum(focal)}
  pred_boxes = jnp.take_along_axis(head.boxes, q_idx[..., None], axis=1)  # (B, G, 4)
  out['loss_bbox'], out['loss_giou'] = box_loss_sums(pred_boxes, targets['boxes'], matched)
  if uniform is not None:
    pred_masks = jnp.take_along_axis(head.masks, q_idx[..., None, None], axis=1)  # (B, G, Hm, Wm)
    gt_masks = targets['mask_points'] if isinstance(uniform, str) else targets['masks']
    out['loss_mask'], out['loss_dice'] = mask_loss_sums(pred_masks, gt_masks, matched, uniform, loss_cfg)
  return out


def dn_assignment(dn_info, targets, num_classes):
  """The fixed DN assignment (docs/architecture.md, "Denoising queries"): slot s of image b reconstructs GT
  `gt_index[b, s]`.

  Returns (class_targets (B, S, C) float32: one-hot for positive slots, zeros for the other active slots;
  class_weight (B, S) float32: 1 on active slots, 0 on inactive padding slots (excluded from every loss);
  gt_index (B, S) int32 clipped to [0, G); positive (B, S) bool: slots with box and mask losses).
  """
  g = targets['labels'].shape[1]
  gt_index = jnp.clip(dn_info.gt_index, 0, g - 1)
  gt_valid = jnp.take_along_axis(targets['valid'], gt_index, axis=1)
  active = jnp.broadcast_to(dn_info.slot_active[None, :], gt_index.shape)
  positive = dn_info.positive & active & gt_valid
  labels = jnp.where(positive, jnp.take_along_axis(targets['labels'], gt_index, axis=1), -1)
  return _labels_one_hot(labels, num_classes), active.astype(jnp.float32), gt_index, positive


def dn_loss_sums(head, targets, assignment, loss_cfg, uniform=None):
  """Unnormalized DN loss sums of one set of DN predictions (B, S, ...) under `dn_assignment`.

  uniform: (B, S, D, 2) uniform values for the mask losses' point sampling, DENSE (see `matched_loss_sums`), or
  None for no mask losses.
  """
  class_targets, class_weight, gt_index, positive = assignment
  focal = sigmoid_focal_loss(head.logits, class_targets, loss_cfg.focal_alpha, loss_cfg.focal_gamma)
  out = {'loss_ce': jnp.sum(focal * class_weight[..., None])}
  gt_boxes = jnp.take_along_axis(targets['boxes'], gt_index[..., None], axis=1)  # (B, S, 4)
  out['loss_bbox'], out['loss_giou'] = box_loss_sums(head.boxes, gt_boxes, positive)
  if uniform is not None:
    if isinstance(uniform, str):  # (B, S, Hm * Wm) GT at the pixel centres
      gt_masks = jnp.take_along_axis(targets['mask_points'], gt_index[..., None], axis=1)
    else:
      gt_masks = jnp.take_along_axis(targets['masks'], gt_index[..., None, None], axis=1)  # (B, S, Hg, Wg)
    out['loss_mask'], out['loss_dice'] = mask_loss_sums(head.masks, gt_masks, positive, uniform, loss_cfg)
  return out


def _stacked(head, sl):
  """HeadOutputs of a slice of the leading (layer) axis."""
  return HeadOutputs(head.logits[sl], head.boxes[sl], None if head.masks is None else head.masks[sl])


def _check_masks(head, what):
  if head.masks is None:
    raise ValueError(
      f'compute_losses: config.loss.mask_losses is True but the {what} predictions have no masks; '
      'set config.loss.mask_losses = False for detection-only training'
    )


def loss_weights(loss_cfg):
  """The weight of each base term name (the same for every copy)."""
  scale = float(loss_cfg.detection_weight_scale)
  return {
    'loss_ce': float(loss_cfg.class_weight) * scale,
    'loss_bbox': float(loss_cfg.box_weight) * scale,
    'loss_giou': float(loss_cfg.giou_weight) * scale,
    'loss_mask': float(loss_cfg.mask_weight),
    'loss_dice': float(loss_cfg.dice_weight),
  }


def _draw_uniforms(rng, shapes):
  """Every uniform number of a step in ONE jax.random call (each call site costs seconds of XLA:CPU compile)."""
  sizes = [math.prod(shape) for shape in shapes.values()]
  flat = jax.random.uniform(rng, (sum(sizes),), jnp.float32)
  out, start = {}, 0
  for (name, shape), size in zip(shapes.items(), sizes):
    out[name] = flat[start : start + size].reshape(shape)
    start += size
  return out


def _given_uniforms(given, match_shapes, loss_points, sets, predictions, loss_cfg):
  """Checks the `uniforms` given to compute_losses: every needed entry present with its shape."""
  want = dict(match_shapes)
  if loss_points:
    d = num_uniform_draws(loss_cfg)
    for name, (head, with_masks) in sets.items():
      if with_masks:
        want['loss_' + name] = (*head.logits.shape[:-3], head.logits.shape[-3], -1, d, 2)
    if predictions.dn is not None and predictions.dn_info is not None:
      want['loss_dn'] = (-1, *predictions.dn.logits.shape[-3:-1], d, 2)
  out = {}
  for key, shape in want.items():
    if key not in given:
      raise ValueError(f'compute_losses: uniforms has no {key!r} (expected shape {shape}, -1 = any)')
    value = jnp.asarray(given[key], jnp.float32)
    if len(value.shape) != len(shape) or any(w not in (-1, g) for g, w in zip(value.shape, shape)):
      raise ValueError(f'compute_losses: uniforms[{key!r}] has shape {value.shape}, expected {shape} (-1 = any)')
    out[key] = value
  return out


def draws_mask_points(config) -> bool:
  """Whether compute_losses draws random numbers (from its rng): the mask losses' or the matcher's mask-cost
  points; their draws are shaped by the batch they are drawn for."""
  loss, match = config.loss, config.matcher
  return bool(loss.mask_losses) and (int(loss.num_points) != 0 or int(match.num_points) != 0)


def compute_losses(predictions, targets, rng, config, num_masks_override=None, uniforms=None):
  """All training losses of one step (the official `SetCriterion.forward` plus the DI `oldm` terms).

  predictions: modeling.outputs.Predictions (layers (N, B, Q, ...), interm (B, K, ...), di_aux (T, B, K, ...)
    or None plus di_aux_more (later DI stages), dn (N, B, S, ...) + dn_info or None).
  targets: dict with 'boxes' (B, G, 4) cxcywh, 'labels' (B, G) int32, 'valid' (B, G) bool (valid first) and,
    with mask losses, 'masks' (B, G, Hg, Wg) binary masks of the padded canvas.
  rng: PRNG key for the matcher's mask-cost points and the losses' importance-sampled points.
  config: the experiment config; reads config.loss.* and config.matcher.*.
  num_masks_override: hook for data parallelism: the normalizer to use instead of the local count of valid GT
    (e.g. the all-reduced count divided by the number of devices, as the official code does). Clamped >= 1.
  uniforms: instead of drawing them from rng, the uniform values of every point sampling (the parity tests give
    the official code's recorded draws): {'match_<set>': (..., B, P, 2) the matcher's points,
    'loss_<set>': (..., B, G, D, 2) the loss points of each GT's pair, 'loss_dn': (N_dn, B, S, D, 2) those of each
    DN slot}, sets 'final', 'aux', 'interm' (leading dims as the set's predictions; D = num_uniform_draws).
    The mask losses are then taken per set (vmapped), not in the `looped_mask_loss_sums` loop.
  Returns (total, terms): the weighted sum and a dict of scalar terms named as in the official code.

  The steps: which prediction sets are supervised (`supervised_sets`, `denoising_layers`); the random points of the
  mask costs and losses (`_point_uniforms`); one Hungarian matching of every set (`_hungarian_matches`); the loss
  sums of each set under its matching or, for denoising, under the fixed assignment (`_named_terms`); their
  weighted sum (`weighted_total`).
  """
  loss_cfg, match_cfg = config.loss, config.matcher
  targets = _checked_targets(targets, loss_cfg)
  num_masks = _num_masks(targets['valid'], num_masks_override)
  sets, di_stages = supervised_sets(predictions, loss_cfg)
  dn = denoising_layers(predictions, loss_cfg)
  if bool(loss_cfg.mask_losses):
    _check_mask_outputs(sets, predictions, dn)
    targets = _with_pixel_centre_gt(targets, predictions, loss_cfg, match_cfg)
  # Point-sampled mask losses: taken in a loop over the stacked sets (`looped_mask_loss_sums`), their points drawn
  # there from k_loss; the dense ones (and all class / box terms) vmapped over each set's stack in `_named_terms`.
  looped = bool(loss_cfg.mask_losses) and int(loss_cfg.num_points) != 0 and uniforms is None
  if looped:
    rng, k_loss = jax.random.split(rng)
  uniforms = _point_uniforms(rng, uniforms, sets, predictions, loss_cfg, match_cfg)
  matches = _hungarian_matches(sets, targets, uniforms, loss_cfg, match_cfg)
  assignment = None
  if dn is not None:
    assignment = dn_assignment(predictions.dn_info, targets, predictions.dn.logits.shape[-1])
  mask_sums = {}
  if looped:
    mask_sums = _looped_mask_terms(predictions, sets, matches, assignment, dn, targets['masks'], k_loss, loss_cfg)
  terms = _named_terms(
    predictions, sets, di_stages, matches, dn, assignment, mask_sums, targets, uniforms, num_masks, loss_cfg
  )
  return weighted_total(terms, loss_cfg), terms


class DenoisingLayers(NamedTuple):
  """The DN predictions that get losses: the last decoder layer's, or every layer's with deep supervision."""

  heads: HeadOutputs  # (count, B, S, ...)
  count: int


def _checked_targets(targets, loss_cfg):
  """targets with 'valid' as bool; 'masks' required with mask losses."""
  if bool(loss_cfg.mask_losses) and 'masks' not in targets:
    raise ValueError("compute_losses: config.loss.mask_losses is True but targets has no 'masks'")
  return {**targets, 'valid': jnp.asarray(targets['valid'], bool)}


def _num_masks(valid, num_masks_override):
  """The normalizer of every term: the number of valid GT of the batch (or the override), clamped >= 1."""
  if num_masks_override is None:
    num_masks = jnp.sum(valid).astype(jnp.float32)
  else:
    num_masks = jnp.asarray(num_masks_override, jnp.float32)
  return jnp.maximum(num_masks, 1.0)


def _deep(predictions, loss_cfg):
  return bool(loss_cfg.deep_supervision) and predictions.num_layers > 1


def supervised_sets(predictions, loss_cfg):
  """The Hungarian-matched sets of predictions of a step.

  Returns (sets, di_stages): sets maps a name to (head with leading dims (..., B, Q, ...), whether it has mask
  costs and losses): 'final' (B, Q), 'aux' (N - 1, B, Q) with deep supervision, 'interm' (B, K) with the encoder
  selection's losses, 'di_aux_{j}' (T, B, K_j) for DI selection stage j (class + box only); di_stages lists the DI
  stages' heads in order.
  """
  use_masks = bool(loss_cfg.mask_losses)
  sets = {'final': (predictions.final, use_masks)}
  if _deep(predictions, loss_cfg):
    sets['aux'] = (_stacked(predictions.layers, slice(0, predictions.num_layers - 1)), use_masks)
  if loss_cfg.interm_losses:
    sets['interm'] = (predictions.interm, use_masks)
  di_stages = []
  if loss_cfg.di_aux_losses and predictions.di_aux is not None:
    di_stages = [predictions.di_aux, *predictions.di_aux_more]
  for j, head in enumerate(di_stages):
    sets[f'di_aux_{j}'] = (head, False)
  return sets, di_stages


def denoising_layers(predictions, loss_cfg):
  """DenoisingLayers of the step, or None without denoising queries."""
  if predictions.dn is None or predictions.dn_info is None:
    return None
  total = predictions.dn.logits.shape[0]
  count = total if _deep(predictions, loss_cfg) else 1
  return DenoisingLayers(_stacked(predictions.dn, slice(total - count, None)), count)


def _check_mask_outputs(sets, predictions, dn):
  for name, (head, with_masks) in sets.items():
    if with_masks:
      _check_masks(head, name)
  if dn is not None:
    _check_masks(predictions.dn, 'dn')


def _with_pixel_centre_gt(targets, predictions, loss_cfg, match_cfg):
  """With dense mask losses or costs (num_points = 0): targets['mask_points'] (B, G, Hm * Wm), the GT at the
  pixel centres of the predicted mask map."""
  if int(loss_cfg.num_points) == 0 or int(match_cfg.num_points) == 0:
    hm, wm = predictions.final.masks.shape[-2:]
    targets = {**targets, 'mask_points': gt_at_pixel_centers(targets['masks'], hm, wm)}
  return targets


def _point_uniforms(rng, given, sets, predictions, loss_cfg, match_cfg):
  """The uniform values of the matcher's mask-cost points ('match_<set>': (..., B, P, 2)), drawn from rng or the
  `given` ones checked; with dense mask losses also 'loss_<set>' / 'loss_dn' = DENSE."""
  use_masks = bool(loss_cfg.mask_losses)
  dense_loss = int(loss_cfg.num_points) == 0
  shapes = {}
  for name, (head, with_masks) in sets.items():
    if with_masks and int(match_cfg.num_points) != 0:
      shapes['match_' + name] = (*head.logits.shape[:-2], int(match_cfg.num_points), 2)  # (..., B, P, 2)
  if given is not None:
    uniforms = _given_uniforms(given, shapes, use_masks and not dense_loss, sets, predictions, loss_cfg)
  else:
    uniforms = _draw_uniforms(rng, shapes) if shapes else {}
  if use_masks and dense_loss:
    uniforms.update({'loss_' + name: DENSE for name, (_, with_masks) in sets.items() if with_masks})
    uniforms['loss_dn'] = DENSE
  return uniforms


def _hungarian_matches(sets, targets, uniforms, loss_cfg, match_cfg):
  """name -> query_for_gt ((..., B, G) int32, -1 = no query): every set matched in one host call."""
  dense_match = int(match_cfg.num_points) == 0

  def mask_cost_args(name, with_masks):
    if with_masks and dense_match:
      return {'gt_points': targets['mask_points']}
    return {'points': uniforms.get('match_' + name)}

  alpha, gamma = float(loss_cfg.focal_alpha), float(loss_cfg.focal_gamma)
  costs = [
    matcher.matching_costs(head, targets, match_cfg, alpha=alpha, gamma=gamma, **mask_cost_args(name, with_masks))
    for name, (head, with_masks) in sets.items()
  ]
  return dict(zip(sets, matcher.hungarian_match(costs, targets['valid'])))


def _vmapped(fn, num_lead, *args):
  """fn(*args, uniform) vmapped over num_lead leading axes of args; uniform (the last arg) is an array, DENSE or
  None (a string or None is closed over, not mapped)."""
  *args, uniform = args
  if isinstance(uniform, str):
    mapped, args = (lambda *a: fn(*a, uniform)), tuple(args)
  else:
    mapped, args = fn, (*args, uniform)
  for _ in range(num_lead):
    mapped = jax.vmap(mapped)
  return mapped(*args)


def _named_terms(
  predictions, sets, di_stages, matches, dn, assignment, mask_sums, targets, uniforms, num_masks, loss_cfg
):
  """Every normalized loss term of the step, named as in the official code (see the module docstring), in the
  order final, denoising, aux layers, encoder selection, DI layers."""
  terms = {}

  def add(prefix, suffix, sums, denom, index=None):
    for base, value in sums.items():
      terms[f'{prefix}{base}{suffix}'] = (value if index is None else value[index]) / denom

  def set_sums(name):
    head = sets[name][0]
    fn = lambda h, q, u: matched_loss_sums(h, targets, q, loss_cfg, u)
    sums = _vmapped(fn, len(head.logits.shape[:-3]), head, matches[name], uniforms.get('loss_' + name))
    return {**sums, **mask_sums.get(name, {})}

  add('', '', set_sums('final'), num_masks)

  if dn is not None:
    groups = jnp.asarray(predictions.dn_info.num_groups, jnp.float32)
    dn_denom = num_masks * jnp.maximum(groups, 1.0)
    fn = lambda h, u: dn_loss_sums(h, targets, assignment, loss_cfg, u)
    sums = {**_vmapped(fn, 1, dn.heads, uniforms.get('loss_dn')), **mask_sums.get('dn', {})}
    sums = {k: jnp.where(groups > 0, v, 0.0) for k, v in sums.items()}  # DN skipped this step: zero terms
    add('', '_dn', sums, dn_denom, -1)
    for i in range(dn.count - 1):
      add('', f'_dn_{i}', sums, dn_denom, i)

  if 'aux' in sets:
    sums = set_sums('aux')
    for i in range(predictions.num_layers - 1):
      add('', f'_{i}', sums, num_masks, i)

  if 'interm' in sets:
    add('', '_interm', set_sums('interm'), num_masks)

  offset = 0  # with three or more selections the later stages continue the oldm index
  for j, head in enumerate(di_stages):
    sums = set_sums(f'di_aux_{j}')
    for i in range(head.logits.shape[0]):
      add('oldm_', f'_{offset + i}', sums, num_masks, i)
    offset += head.logits.shape[0]
  return terms


def weighted_total(terms, loss_cfg):
  """sum(weight * term) over the terms in their order, the weight of each term its base name's."""
  weights = loss_weights(loss_cfg)
  total = jnp.zeros((), jnp.float32)
  for name, value in terms.items():
    total = total + weights[_base_name(name)] * value
  return total


def _looped_mask_terms(predictions, sets, matches, assignment, dn, gt_masks, key, loss_cfg):
  """The point-sampled loss_mask / loss_dice sums of every mask set: name -> {'loss_mask', 'loss_dice'} shaped
  like that set's other sums (scalars; (L,) for the stacked 'aux' and 'dn').

  With deep supervision the decoder layers (final + aux) and the DN layers are one loop over the N layers (one
  `looped_mask_loss_sums` call: the matched queries and the DN slots of layer l at step l); the encoder selection
  (and without deep supervision final and DN, both one entry) a loop of one step.

  With `predictions.mask_factors` (training mode) the loop forms the masks of the matched queries and DN slots
  from their embeddings (EmbeddedMasks), so the gradient never touches the dense masks of all queries; without
  it, it takes them from the dense masks. The same products either way.
  """
  deep = 'aux' in sets
  factors = predictions.mask_factors
  n = predictions.num_layers

  def stacked_masks(which, first):
    """The masks of `which` ('layers', 'dn', 'interm') from stack entry `first` on: (L, B, Q, ...) or EmbeddedMasks."""
    if factors is None:
      if which == 'interm':
        return predictions.interm.masks[None]
      return (predictions.layers if which == 'layers' else predictions.dn).masks[first:]
    if which == 'interm':
      return EmbeddedMasks(factors.interm_embeds[None], jnp.zeros((1,), jnp.int32))
    embeds = (
      factors.embeds[first:, :, factors.num_dn :] if which == 'layers' else factors.embeds[first:, :, : factors.num_dn]
    )
    return EmbeddedMasks(embeds, jnp.asarray(factors.feature_index[first:], jnp.int32))

  def matched(masks, query_for_gt, num_queries):  # query_for_gt (L, B, G)
    q = jnp.clip(query_for_gt, 0, num_queries - 1)
    return MaskPairs(masks, q, None, (query_for_gt >= 0).astype(jnp.float32))

  num_q = predictions.layers.logits.shape[-2]
  groups = {}  # leading size L -> [(name, MaskPairs)]: one loop each
  if deep:
    layer_q = jnp.concatenate([matches['aux'], matches['final'][None]], axis=0)
    groups.setdefault(n, []).append(('layers', matched(stacked_masks('layers', 0), layer_q, num_q)))
  else:
    groups.setdefault(1, []).append(('layers', matched(stacked_masks('layers', n - 1), matches['final'][None], num_q)))
  if assignment is not None:
    _, _, gt_index, positive = assignment
    lead = (dn.count, *gt_index.shape)
    pairs = MaskPairs(
      stacked_masks('dn', predictions.dn.logits.shape[0] - dn.count),
      None,
      jnp.broadcast_to(gt_index, lead),
      jnp.broadcast_to(positive.astype(jnp.float32), lead),
    )
    groups.setdefault(dn.count, []).append(('dn', pairs))
  if 'interm' in sets and sets['interm'][1]:
    num_k = predictions.interm.logits.shape[-2]
    groups.setdefault(1, []).append(('interm', matched(stacked_masks('interm', 0), matches['interm'][None], num_k)))
  features = None if factors is None else factors.features
  out = {}
  for i, group in enumerate(groups.values()):
    sums = looped_mask_loss_sums([p for _, p in group], gt_masks, jax.random.fold_in(key, i), loss_cfg, features)
    for (name, _), (bce, dice) in zip(group, sums):
      out[name] = {'loss_mask': bce, 'loss_dice': dice}
  layers = out.pop('layers')
  out['final'] = {k: v[-1] for k, v in layers.items()}
  if deep:
    out['aux'] = {k: v[:-1] for k, v in layers.items()}
  if 'interm' in out:
    out['interm'] = {k: v[0] for k, v in out['interm'].items()}
  return out


def _base_name(term):
  """'oldm_loss_ce_1' / 'loss_mask_dn_3' / 'loss_giou_interm' -> the base term name."""
  name = term.removeprefix('oldm_')
  for base in (*BOX_TERMS, *MASK_TERMS):
    if name == base or name.startswith(base + '_'):
      return base
  raise KeyError(term)
