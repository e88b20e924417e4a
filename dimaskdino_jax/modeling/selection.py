"""Two-stage query selection: encoder proposals, top-k + gather, mask-enhanced anchors (docs/architecture.md,
"First selection").

All functions are pure jnp with static shapes.
"""

import jax
import jax.numpy as jnp
import numpy as np

from dimaskdino_jax.box_ops import inverse_sigmoid

# Stand-in for the official +inf on invalid proposals: sigmoid gives exactly 1.0 in float32 and no inf/nan
# reaches a gradient.
INVALID_PROPOSAL = 1e8


def encoder_proposals(spatial_shapes):
  """Proposal boxes in logit space and their validity, levels in the given (decoder) order.

  Level l (in the order given) gets w = h = 0.05 * 2**l: with the decoder's reversed order the coarsest level
  gets 0.05 and the finest 0.4 (the MaskDINO quirk). A proposal is valid iff all four coordinates lie in
  (0.01, 0.99). Returns (proposals (S, 4) logits, INVALID_PROPOSAL where invalid; valid (S,) bool).
  """
  per_level = []
  for lvl, (h, w) in enumerate(spatial_shapes):
    # Static centres divided on the host in float32 like torch: XLA rewrites x / w as x * (1 / w), which rounds
    # 49.5 / 50 to 0.98999995 (valid) where torch gets 0.99000001 (invalid), at the 1/16 level of 800 px images.
    ys, xs = np.meshgrid(
      (np.arange(h, dtype=np.float32) + np.float32(0.5)) / np.float32(h),
      (np.arange(w, dtype=np.float32) + np.float32(0.5)) / np.float32(w),
      indexing='ij',
    )
    wh = jnp.full((h * w, 2), 0.05 * (2.0**lvl))
    per_level.append(jnp.concatenate([xs.reshape(-1, 1), ys.reshape(-1, 1), wh], -1))
  proposals = jnp.concatenate(per_level, 0).astype(jnp.float32)  # (S, 4) cxcywh
  valid = jnp.all((proposals > 0.01) & (proposals < 0.99), axis=-1)
  logits = jnp.log(proposals / (1 - proposals))
  return jnp.where(valid[:, None], logits, INVALID_PROPOSAL), valid


def topk_indices(logits, k):
  """Indices of the k tokens with the highest max-over-classes logit: logits (B, S, C) -> (B, k) int32.

  Descending order like torch.topk; ties resolve to the lower index (jax.lax.top_k).
  """
  return jax.lax.top_k(jnp.max(logits, axis=-1), k)[1]


def gather_tokens(x, idx):
  """x (B, S, ...) gathered at idx (B, k) -> (B, k, ...)."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def masks_to_boxes(masks, plus_one=False):
  """Tight boxes of binary masks (..., H, W) -> (..., 4) cxcywh normalized by (W, H).

  Official mask2box: min/max pixel indices with no +1 (a one-pixel mask has w = 0); an empty mask gives
  x_min = y_min = 1e8 and x_max = y_max = 0 before conversion. `plus_one` gives detectron2's BitMasks boxes.
  """
  h, w = masks.shape[-2:]
  binary = masks.astype(bool)
  rows = jnp.any(binary, axis=-1)  # (..., H)
  cols = jnp.any(binary, axis=-2)  # (..., W)
  ys = jnp.arange(h, dtype=jnp.float32)
  xs = jnp.arange(w, dtype=jnp.float32)
  big = jnp.float32(1e8)
  x0 = jnp.min(jnp.where(cols, xs, big), axis=-1)
  x1 = jnp.max(jnp.where(cols, xs, 0.0), axis=-1)
  y0 = jnp.min(jnp.where(rows, ys, big), axis=-1)
  y1 = jnp.max(jnp.where(rows, ys, 0.0), axis=-1)
  if plus_one:
    nonempty = jnp.any(cols, axis=-1)
    x0, y0 = jnp.where(nonempty, x0, 0.0), jnp.where(nonempty, y0, 0.0)
    x1, y1 = jnp.where(nonempty, x1 + 1, 0.0), jnp.where(nonempty, y1 + 1, 0.0)
  box = jnp.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)
  return box / jnp.array([w, h, w, h], jnp.float32)


def mask2box_anchors(mask_logits, plus_one=False):
  """Anchors from (detached) mask logits (B, K, Hm, Wm): inverse_sigmoid of the tight boxes of logit > 0."""
  boxes = masks_to_boxes(jax.lax.stop_gradient(mask_logits) > 0, plus_one)
  return inverse_sigmoid(boxes)
