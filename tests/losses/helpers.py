"""Tiny synthetic targets / predictions and float64 NumPy references written from the definitions (ref 4.1, 4.2)."""

import jax.numpy as jnp
import numpy as np

from configs import shapes
from dimaskdino_jax.modeling.outputs import DenoisingInfo, HeadOutputs, Predictions

B, Q, G, C, K, T = 2, 6, 3, 4, 8, 2
N_LAYERS = 3  # initial + 2 decoder layers
GT_HW = (16, 16)
PRED_HW = (8, 8)


def tiny_config(num_points=32):
  c = shapes.get_config()
  c.loss.focal_alpha = 0.25  # the official alpha, which the NumPy references below use (configs/shapes.py: 0.75)
  c.loss.num_points = num_points
  c.matcher.num_points = num_points
  return c


def rect_masks(boxes, hw):
  """Binary masks (..., H, W) uint8 of cxcywh boxes (pixel centers inside the box)."""
  h, w = hw
  ys = (np.arange(h) + 0.5) / h
  xs = (np.arange(w) + 0.5) / w
  cx, cy, bw, bh = (boxes[..., i, None, None] for i in range(4))
  inside = (np.abs(xs[None, :] - cx) <= bw / 2) & (np.abs(ys[:, None] - cy) <= bh / 2)
  return inside.astype(np.uint8)


def make_targets(seed=0, counts=(3, 1), g=G, hw=GT_HW):
  rng = np.random.default_rng(seed)
  b = len(counts)
  boxes = np.zeros((b, g, 4), np.float32)
  labels = np.zeros((b, g), np.int32)
  valid = np.zeros((b, g), bool)
  for i, n in enumerate(counts):
    wh = rng.uniform(0.2, 0.5, (n, 2))
    c = rng.uniform(0.3, 0.7, (n, 2))
    boxes[i, :n] = np.concatenate([c, wh], -1)
    labels[i, :n] = rng.integers(0, C, n)
    valid[i, :n] = True
  masks = rect_masks(boxes, hw) * valid[..., None, None].astype(np.uint8)
  return {'boxes': boxes, 'labels': labels, 'valid': valid, 'masks': masks}


def random_head(rng, lead, q, with_masks=True, hw=PRED_HW):
  logits = rng.normal(size=(*lead, q, C)).astype(np.float32)
  boxes = np.concatenate([rng.uniform(0.2, 0.8, (*lead, q, 2)), rng.uniform(0.1, 0.5, (*lead, q, 2))], -1)
  masks = rng.normal(scale=3.0, size=(*lead, q, *hw)).astype(np.float32) if with_masks else None
  return HeadOutputs(
    jnp.asarray(logits), jnp.asarray(boxes, jnp.float32), None if masks is None else jnp.asarray(masks)
  )


def make_dn_info(num_groups, single_pad, counts, num_slots):
  """DenoisingInfo as documented in outputs.py (built independently of the model code)."""
  s = np.arange(num_slots)
  active = s < num_groups * single_pad
  gt_index = np.tile(s % max(single_pad, 1), (len(counts), 1)).astype(np.int32)
  positive = active[None, :] & (gt_index < np.asarray(counts)[:, None])
  return DenoisingInfo(
    jnp.asarray(active), jnp.asarray(gt_index), jnp.asarray(positive), jnp.asarray(num_groups, jnp.int32)
  )


def make_predictions(seed=0, counts=(3, 1), num_groups=2, with_masks=True, num_slots=Q, di_more=0):
  """Random Predictions; `di_more` later DI stages (three or more selections) of T layers over 5 tokens each."""
  rng = np.random.default_rng(seed)
  b = len(counts)
  return Predictions(
    layers=random_head(rng, (N_LAYERS, b), Q, with_masks),
    interm=random_head(rng, (b,), K, with_masks),
    di_aux=random_head(rng, (T, b), K, with_masks=False),
    di_aux_more=tuple(random_head(rng, (T, b), 5, with_masks=False) for _ in range(di_more)),
    dn=random_head(rng, (N_LAYERS, b), num_slots, with_masks),
    dn_info=make_dn_info(num_groups, max(counts), counts, num_slots),
  )


# ---------------------------------------------------------------- float64 NumPy references


def np_sigmoid(x):
  return 1 / (1 + np.exp(-x))


def np_point_sample(m, pts):
  """grid_sample(bilinear, zeros, align_corners=False) of one map (H, W) at (P, 2) points, via a zero-padded map."""
  h, w = m.shape
  padded = np.zeros((h + 2, w + 2))
  padded[1:-1, 1:-1] = m
  out = np.zeros(len(pts))
  for k, (x, y) in enumerate(np.asarray(pts, np.float64)):
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = int(np.floor(px)), int(np.floor(py))
    ax, ay = px - x0, py - y0
    v = 0.0
    for dy, wy in ((0, 1 - ay), (1, ay)):
      for dx, wx in ((0, 1 - ax), (1, ax)):
        yy, xx = min(max(y0 + dy + 1, 0), h + 1), min(max(x0 + dx + 1, 0), w + 1)
        v += wy * wx * padded[yy, xx]
    out[k] = v
  return out


def np_focal(x, t, alpha=0.25, gamma=2.0):
  p = np_sigmoid(x)
  ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
  p_t = p * t + (1 - p) * (1 - t)
  return (alpha * t + (1 - alpha) * (1 - t)) * (1 - p_t) ** gamma * ce


def np_xyxy(b):
  return np.array([b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2])


def np_giou(a, b):
  """GIoU of two cxcywh boxes, from the definition."""
  a, b = np_xyxy(np.asarray(a, np.float64)), np_xyxy(np.asarray(b, np.float64))
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = iw * ih
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
  return inter / union - (hull - union) / hull


def np_bce(x, t):
  p = np_sigmoid(x)
  return -(t * np.log(p) + (1 - t) * np.log(1 - p))


def np_dice(x, t):
  s = np_sigmoid(x)
  return 1 - (2 * np.sum(s * t) + 1) / (np.sum(s) + np.sum(t) + 1)


def np_matched_losses(logits, boxes, targets, query_for_gt, alpha=0.25, gamma=2.0):
  """Unnormalized loss_ce / loss_bbox / loss_giou sums of one set (B, Q, ...) under query_for_gt (B, G)."""
  logits = np.asarray(logits, np.float64)
  boxes = np.asarray(boxes, np.float64)
  onehot = np.zeros_like(logits)
  l1 = giou = 0.0
  for b in range(logits.shape[0]):
    for j, q in enumerate(np.asarray(query_for_gt[b])):
      if q < 0:
        continue
      onehot[b, q, targets['labels'][b, j]] = 1
      l1 += np.abs(boxes[b, q] - targets['boxes'][b, j]).sum()
      giou += 1 - np_giou(boxes[b, q], targets['boxes'][b, j])
  return {'loss_ce': np_focal(logits, onehot, alpha, gamma).sum(), 'loss_bbox': l1, 'loss_giou': giou}


def np_match_cost(logits, boxes, labels, gt_boxes, weights, masks=None, gt_masks=None, points=None, alpha=0.25):
  """(Q, n) matching cost of one image against its n valid GT, as docs/architecture.md "Losses" describes it
  (loops, float64); `alpha` the focal class cost's (the official 0.25)."""
  logits = np.asarray(logits, np.float64)
  q, n = logits.shape[0], len(labels)
  cost = np.zeros((q, n))
  for i in range(q):
    if masks is not None:
      x = np_point_sample(np.asarray(masks[i], np.float64), points)
    for j in range(n):
      p = np_sigmoid(logits[i, labels[j]])
      pos = alpha * (1 - p) ** 2 * -np.log(p + 1e-8)
      neg = (1 - alpha) * p**2 * -np.log(1 - p + 1e-8)
      c = weights['cost_class'] * (pos - neg)
      c += weights['cost_box'] * np.abs(np.asarray(boxes[i], np.float64) - gt_boxes[j]).sum()
      c -= weights['cost_giou'] * np_giou(boxes[i], gt_boxes[j])
      if masks is not None:
        t = np_point_sample(np.asarray(gt_masks[j], np.float64), points)
        c += weights['cost_mask'] * np_bce(x, t).mean() + weights['cost_dice'] * np_dice(x, t)
      cost[i, j] = c
  return cost


def np_dn_losses(logits, boxes, targets, num_groups, single_pad, num_masks, alpha=0.25, gamma=2.0):
  """DN class/box terms of one layer (B, S, ...) with the official fixed assignment: slot g * single_pad + t
  reconstructs GT t for g < num_groups, t < n_b; other slots below num_groups * single_pad are background."""
  logits = np.asarray(logits, np.float64)
  b, s, c = logits.shape
  pad = num_groups * single_pad
  onehot = np.zeros((b, s, c))
  l1 = giou = 0.0
  for i in range(b):
    n = int(targets['valid'][i].sum())
    for g in range(num_groups):
      for t in range(n):
        slot = g * single_pad + t
        onehot[i, slot, targets['labels'][i, t]] = 1
        l1 += np.abs(np.asarray(boxes[i, slot], np.float64) - targets['boxes'][i, t]).sum()
        giou += 1 - np_giou(boxes[i, slot], targets['boxes'][i, t])
  ce = np_focal(logits[:, :pad], onehot[:, :pad], alpha, gamma).sum()
  denom = num_masks * max(num_groups, 1)
  scale = 1.0 if num_groups > 0 else 0.0
  return {'loss_ce': scale * ce / denom, 'loss_bbox': scale * l1 / denom, 'loss_giou': scale * giou / denom}
