"""Box conversions, IoU / GIoU and inverse_sigmoid, with the official code's exact conventions.

Boxes are (cx, cy, w, h) normalized to the padded canvas unless a name says xyxy. Functions work on jax and
numpy arrays (`xp` is chosen from the input) so the host-side matcher and evaluator share them.
"""

import jax.numpy as jnp
import numpy as np


def _xp(x):
  """The array module of x: numpy for numpy arrays, jax.numpy otherwise."""
  return np if isinstance(x, np.ndarray) else jnp


def box_cxcywh_to_xyxy(boxes):
  """(..., 4) cxcywh -> (..., 4) x0y0x1y1."""
  xp = _xp(boxes)
  cx, cy, w, h = boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3]
  return xp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], axis=-1)


def box_xyxy_to_cxcywh(boxes):
  """(..., 4) x0y0x1y1 -> (..., 4) cxcywh."""
  xp = _xp(boxes)
  x0, y0, x1, y1 = boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3]
  return xp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def box_area(boxes):
  """(..., 4) xyxy -> (...)."""
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def pairwise_box_iou(a, b):
  """IoU and union of every pair: a (N, 4), b (M, 4) xyxy -> (N, M), (N, M)."""
  xp = _xp(a)
  area_a, area_b = box_area(a), box_area(b)
  lt = xp.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2)
  rb = xp.minimum(a[:, None, 2:], b[None, :, 2:])
  wh = xp.clip(rb - lt, 0, None)
  inter = wh[..., 0] * wh[..., 1]
  union = area_a[:, None] + area_b[None, :] - inter
  return inter / union, union


def pairwise_generalized_box_iou(a, b):
  """Generalized IoU of every pair (N, 4) x (M, 4) xyxy -> (N, M), as torchvision/DETR define it."""
  xp = _xp(a)
  iou, union = pairwise_box_iou(a, b)
  lt = xp.minimum(a[:, None, :2], b[None, :, :2])
  rb = xp.maximum(a[:, None, 2:], b[None, :, 2:])
  wh = xp.clip(rb - lt, 0, None)
  area = wh[..., 0] * wh[..., 1]
  return iou - (area - union) / area


def elementwise_generalized_box_iou(a, b):
  """Generalized IoU of matched pairs: a, b (..., 4) xyxy -> (...)."""
  xp = _xp(a)
  area_a, area_b = box_area(a), box_area(b)
  lt = xp.maximum(a[..., :2], b[..., :2])
  rb = xp.minimum(a[..., 2:], b[..., 2:])
  wh = xp.clip(rb - lt, 0, None)
  inter = wh[..., 0] * wh[..., 1]
  union = area_a + area_b - inter
  iou = inter / union
  lt = xp.minimum(a[..., :2], b[..., :2])
  rb = xp.maximum(a[..., 2:], b[..., 2:])
  wh = xp.clip(rb - lt, 0, None)
  area = wh[..., 0] * wh[..., 1]
  return iou - (area - union) / area


def inverse_sigmoid(x, eps=1e-5):
  """log(x / (1 - x)) with the official clamps: x to [0, 1], numerator and denominator to >= eps."""
  xp = _xp(x)
  x = xp.clip(x, 0.0, 1.0)
  return xp.log(xp.maximum(x, eps) / xp.maximum(1.0 - x, eps))
