"""Hungarian matching (docs/architecture.md, "Losses"): cost matrices in JAX, one host call to scipy per step.

The costs follow `HungarianMatcher.memory_efficient_forward` of the official code, computed in fp32 without
gradient:

  C = cost_class * focal_class + cost_box * L1(cxcywh) + cost_giou * (-GIoU(xyxy))
      + cost_mask * BCE(points) + cost_dice * dice(points)

where the mask costs use one set of `matcher.num_points` uniform points per image (shared by all its masks), or
with `matcher.num_points = 0` every pixel centre of the predicted mask map (the GT sampled there once per step), and
are left out for class+box-only matchings (the DI `oldm` outputs). `hungarian_match` then solves every matching
of a training step (final, aux, interm, DI aux; all images) in ONE `jax.pure_callback` to
`scipy.optimize.linear_sum_assignment` (one per device under a data-parallel mesh: each device's images only,
kernels/per_shard.py), and returns static-shape results: for every matching set and image a
(G,) int32 array `query_for_gt` (the query matched to each GT, -1 for padded / unmatched GT).
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from dimaskdino_jax import box_ops
from dimaskdino_jax.losses.point_sampling import point_sample
from kernels.per_shard import per_shard

# Fill value of padded query rows and padded GT columns; the host solver never reads those entries.
PAD_COST = 1e8
_HIGHEST = jax.lax.Precision.HIGHEST


def focal_class_cost(logits, gt_labels, alpha=0.25, gamma=2.0):
  """Focal-style class cost, logits (Q, C), gt_labels (G,) -> (Q, G) (eps 1e-8 as the official code)."""
  p = jax.nn.sigmoid(logits.astype(jnp.float32))
  neg = (1 - alpha) * (p**gamma) * (-jnp.log(1 - p + 1e-8))
  pos = alpha * ((1 - p) ** gamma) * (-jnp.log(p + 1e-8))
  labels = jnp.clip(gt_labels, 0, logits.shape[-1] - 1)
  return jnp.take(pos, labels, axis=1) - jnp.take(neg, labels, axis=1)


def box_costs(boxes, gt_boxes):
  """L1 cdist on cxcywh and -GIoU on xyxy: boxes (Q, 4), gt_boxes (G, 4) -> ((Q, G), (Q, G))."""
  boxes = boxes.astype(jnp.float32)
  gt_boxes = gt_boxes.astype(jnp.float32)
  l1 = jnp.sum(jnp.abs(boxes[:, None, :] - gt_boxes[None, :, :]), axis=-1)
  giou = box_ops.pairwise_generalized_box_iou(box_ops.box_cxcywh_to_xyxy(boxes), box_ops.box_cxcywh_to_xyxy(gt_boxes))
  return l1, -giou


def mask_costs(point_logits, point_labels):
  """Pairwise sigmoid BCE (mean over points) and dice: point_logits (Q, P), point_labels (G, P) -> (Q, G) x 2."""
  x = point_logits.astype(jnp.float32)
  t = point_labels.astype(jnp.float32)
  n_points = x.shape[-1]
  # The official pos @ t^T + neg @ (1 - t)^T with pos = softplus(-x) (BCE against 1) and neg = softplus(x) (against
  # 0): since softplus(-x) = softplus(x) - x, it equals sum_p neg - x @ t^T, one softplus pass and one product
  # instead of two of each (the matcher's mask costs at 300 queries x 12,544 points: 471 -> 322 ms per R50 step;
  # equal to ~1e-6 absolute on costs of order 1).
  neg = jax.nn.softplus(x)  # (Q, P)
  bce = (jnp.sum(neg, -1)[:, None] - jnp.einsum('qp,gp->qg', x, t, precision=_HIGHEST)) / n_points
  s = jax.nn.sigmoid(x)
  numerator = 2 * jnp.einsum('qp,gp->qg', s, t, precision=_HIGHEST)
  denominator = jnp.sum(s, -1)[:, None] + jnp.sum(t, -1)[None, :]
  dice = 1 - (numerator + 1) / (denominator + 1)
  return bce, dice


def image_cost(
  logits, boxes, gt_labels, gt_boxes, gt_valid, weights, masks=None, gt_masks=None, points=None, alpha=0.25, gamma=2.0
):
  """Total matching cost of one image, (Q, G) fp32; padded GT columns are PAD_COST.

  logits (Q, C), boxes (Q, 4) cxcywh; gt_labels (G,), gt_boxes (G, 4), gt_valid (G,);
  weights: mapping with cost_class, cost_box, cost_giou, cost_mask, cost_dice;
  masks (Q, Hm, Wm) logits, gt_masks (G, Hg, Wg), points (P, 2): mask costs, or None for class+box only.
  With points None and gt_masks (G, Hm * Wm) (the GT already sampled at the pixel centres of the mask map), the
  mask costs are taken at every pixel.
  """
  cost = weights['cost_class'] * focal_class_cost(logits, gt_labels, alpha, gamma)
  l1, neg_giou = box_costs(boxes, gt_boxes)
  cost = cost + weights['cost_box'] * l1 + weights['cost_giou'] * neg_giou
  if masks is not None:
    if points is None:
      point_logits, point_labels = masks.reshape(masks.shape[0], -1).astype(jnp.float32), gt_masks
    else:
      point_logits, point_labels = point_sample(masks.astype(jnp.float32), points), point_sample(gt_masks, points)
    bce, dice = mask_costs(point_logits, point_labels)
    cost = cost + weights['cost_mask'] * bce + weights['cost_dice'] * dice
  return jnp.where(gt_valid[None, :], cost, PAD_COST)


def matching_costs(head, targets, matcher_cfg, points=None, alpha=0.25, gamma=2.0, gt_points=None):
  """Cost matrices of one (possibly stacked) set of predictions, without gradient.

  head: HeadOutputs with logits (..., B, Q, C), boxes (..., B, Q, 4), masks (..., B, Q, Hm, Wm) or None.
  targets: dict with 'labels' (B, G), 'boxes' (B, G, 4), 'valid' (B, G) and, for mask costs, 'masks' (B, G, Hg, Wg).
  matcher_cfg: config.matcher (cost weights).
  points: (..., B, P, 2) uniform (x, y) in [0, 1], one set per image shared by all its masks (the official code
    draws fresh points per matcher call), to add the mask costs; None for class + box costs only.
  gt_points: instead of points, (B, G, Hm * Wm) the GT masks sampled at every pixel centre of the predicted mask
    map (`matcher.num_points = 0`): mask costs over all pixels.
  Returns (..., B, Q, G) float32 (padded GT columns PAD_COST).
  """
  weights = {k: float(matcher_cfg[k]) for k in ('cost_class', 'cost_box', 'cost_giou', 'cost_mask', 'cost_dice')}
  logits = jax.lax.stop_gradient(head.logits)
  boxes = jax.lax.stop_gradient(head.boxes)
  lead = logits.shape[:-3]
  masks = gt_masks = None
  if points is not None or gt_points is not None:
    if head.masks is None:
      raise ValueError('matching_costs: mask costs asked for but the predictions have no masks')
    masks = jax.lax.stop_gradient(head.masks)
    if points is not None:
      points = jax.lax.stop_gradient(points)
      gt_masks = targets['masks']
    else:
      gt_masks = gt_points

  def per_image(lg, bx, m, pt, gl, gb, gv, gm):
    return image_cost(lg, bx, gl, gb, gv, weights, masks=m, gt_masks=gm, points=pt, alpha=alpha, gamma=gamma)

  fn = jax.vmap(per_image)  # over B
  for _ in lead:
    fn = jax.vmap(fn, in_axes=(0, 0, 0, 0, None, None, None, None))
  return fn(logits, boxes, masks, points, targets['labels'], targets['boxes'], targets['valid'], gt_masks)


def _solve_host(costs, gt_valid, num_queries):
  """Host side: scipy's linear_sum_assignment for every (set, image).

  costs (..., M, B, Qmax, G) float32, gt_valid (..., B, G) bool (the leading dims come from vmap with
  vmap_method='expand_dims' and broadcast), num_queries: the real query count of each of the M sets.
  Returns (..., M, B, G) int32: the query matched to each GT, -1 where none.
  """
  costs = np.asarray(costs)
  gt_valid = np.asarray(gt_valid)
  m, b, _, g = costs.shape[-4:]
  lead = np.broadcast_shapes(costs.shape[:-4], gt_valid.shape[:-2])
  costs = np.broadcast_to(costs, (*lead, *costs.shape[-4:])).reshape(-1, *costs.shape[-4:])
  gt_valid = np.broadcast_to(gt_valid, (*lead, b, g)).reshape(-1, b, g)
  out = np.full((costs.shape[0], m, b, g), -1, np.int32)
  for v in range(costs.shape[0]):
    for i in range(m):
      for j in range(b):
        cols = np.flatnonzero(gt_valid[v, j])
        if cols.size == 0 or num_queries[i] == 0:
          continue
        sub = costs[v, i, j, : num_queries[i]][:, cols].astype(np.float64)
        # A non-finite cost (a diverged prediction) would make scipy raise; treat it as a very bad pair.
        sub = np.nan_to_num(sub, nan=PAD_COST, posinf=PAD_COST, neginf=-PAD_COST)
        rows, picked = scipy.optimize.linear_sum_assignment(sub)
        out[v, i, j, cols[picked]] = rows
  return out.reshape(*lead, m, b, g)


def hungarian_match(costs: Sequence, gt_valid):
  """Solves all matchings of a step in ONE host callback.

  costs: sequence of arrays (..., B, Q_i, G) (any leading dims, e.g. stacked layers; Q_i may differ per array).
  gt_valid: (B, G) bool; False columns are never matched.
  Returns a list like `costs` of (..., B, G) int32 `query_for_gt` (-1 = GT padded or left unmatched when a set
  has fewer queries than GT). Works under jit, vmap (vmap_method='expand_dims') and grad (no gradient).
  """
  costs = [jax.lax.stop_gradient(jnp.asarray(c, jnp.float32)) for c in costs]
  b, g = gt_valid.shape
  q_max = max(c.shape[-2] for c in costs)
  flat, num_queries, leads = [], [], []
  for c in costs:
    lead, q = c.shape[:-3], c.shape[-2]
    c = c.reshape(-1, b, q, g)
    c = jnp.pad(c, ((0, 0), (0, 0), (0, q_max - q), (0, 0)), constant_values=PAD_COST)
    flat.append(c)
    num_queries += [q] * c.shape[0]
    leads.append(lead)
  stacked = jnp.concatenate(flat, axis=0)  # (M, B, Qmax, G)
  # Looked up at trace time so tests can wrap it to count host calls.
  host = functools.partial(_solve_host, num_queries=tuple(num_queries))

  def solve(c, v):  # (M, b, Qmax, G), (b, G) -> (M, b, G): b = B, or this device's rows under a data mesh
    shape = jax.ShapeDtypeStruct((c.shape[0], *v.shape), jnp.int32)
    return jax.pure_callback(host, shape, c, v, vmap_method='expand_dims')

  # Data parallel (a `data` mesh set at trace time): one callback per device with its own images only.
  out = per_shard(solve, (1, 0), 1)(stacked, gt_valid.astype(bool))
  results, start = [], 0
  for lead, c in zip(leads, flat):
    n = c.shape[0]
    results.append(out[start : start + n].reshape(*lead, b, g))
    start += n
  return results


def gt_for_queries(query_for_gt, num_queries):
  """Inverts a matching: query_for_gt (..., G) -> (..., Q) int32, the GT matched to each query or -1."""
  g = query_for_gt.shape[-1]
  lead = query_for_gt.shape[:-1]
  q_idx = jnp.where(query_for_gt >= 0, query_for_gt, num_queries).reshape(-1, g)
  gt_ids = jnp.broadcast_to(jnp.arange(g, dtype=jnp.int32), q_idx.shape)
  out = jax.vmap(lambda qi, gi: jnp.full((num_queries,), -1, jnp.int32).at[qi].set(gi, mode='drop'))(q_idx, gt_ids)
  return out.reshape(*lead, num_queries)
