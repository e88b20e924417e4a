"""Denoising (DN) queries and the decoder self-attention mask with static shapes
(docs/architecture.md, "Denoising queries").

The official code pads DN to `pad_size = groups * max_gt` slots, a shape that changes every batch. Here DN
always has S = `dn.num` slots; `groups = S // max_gt` and `max_gt` are traced values. Slots past
`pad_size` are inactive: zero content and anchors, they see only themselves, nothing sees them, and they get
no loss, so the active slots and the matching queries compute exactly what the official code computes.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from dimaskdino_jax.box_ops import inverse_sigmoid
from dimaskdino_jax.modeling.outputs import DenoisingInfo


def max_gt_count(valid):
  """() int32: the largest number of valid GT of one image of the batch, valid (B, G); its DN groups follow it."""
  return jnp.max(jnp.sum(valid, axis=-1)).astype(jnp.int32)


def dn_layout(valid, num_slots, max_gt=None):
  """The DN slot layout for GT validity (B, G) (valid entries packed first).

  max_gt: None, or the largest GT count of the whole batch when `valid` holds only some of its images (the data-
  parallel step runs the model per shard; the layout, like the official code's, follows the batch's largest count).
  Returns DenoisingInfo and `group` (S,) int32: the DN group of each slot (-1 when inactive).
  """
  n = jnp.sum(valid, axis=-1).astype(jnp.int32)  # (B,) GT per image
  max_gt = max_gt_count(valid) if max_gt is None else jnp.asarray(max_gt, jnp.int32)
  single_pad = jnp.maximum(max_gt, 1)
  groups = jnp.where((max_gt > 0) & (max_gt <= num_slots), num_slots // single_pad, 0).astype(jnp.int32)
  s = jnp.arange(num_slots, dtype=jnp.int32)
  active = s < groups * max_gt  # (S,)
  t = s % single_pad  # (S,) GT index within the group
  positive = active[None, :] & (t[None, :] < n[:, None])  # (B, S)
  group = jnp.where(active, s // single_pad, -1)
  info = DenoisingInfo(
    slot_active=active,
    gt_index=jnp.broadcast_to(t[None, :], positive.shape),
    positive=positive,
    num_groups=groups,
  )
  return info, group


def dn_attention_mask(group, num_queries):
  """(S + Q, S + Q) bool, True = blocked. Rows/cols [0, S) are DN slots, [S, S + Q) matching queries.

  * matching queries see no DN slot;
  * an active DN slot sees its own group and every matching query, no other group;
  * an inactive slot (group -1) sees only itself, and no other query sees it.
  """
  s = group.shape[0]
  total = s + num_queries
  is_dn = jnp.arange(total) < s
  g = jnp.concatenate([group, jnp.full((num_queries,), -2, jnp.int32)])  # (S+Q,)
  row_dn, col_dn = is_dn[:, None], is_dn[None, :]
  same_group = g[:, None] == g[None, :]
  eye = jnp.eye(total, dtype=bool)
  active_row = row_dn & (g[:, None] >= 0)
  blocked = jnp.zeros((total, total), bool)
  blocked = blocked | (~row_dn & col_dn)  # matching -> DN
  blocked = blocked | (active_row & col_dn & ~same_group)  # DN group -> other groups / inactive slots
  inactive_row = row_dn & (g[:, None] < 0)
  blocked = blocked | (inactive_row & ~eye)  # inactive slot sees only itself
  return blocked


class DnNoise(NamedTuple):
  """The random draws behind the DN queries, in the (B, S) slot layout of `dn_layout` (values at non-positive
  slots are ignored).

  flip:    (B, S) bool, True where the label is replaced (the official `p < noise_scale / 2`).
  classes: (B, S) int32 in [0, C), the replacement class where `flip` (the official `randint(0, C)`).
  box:     (B, S, 4) float32 in [-1, 1], the box noise direction (the official `rand * 2 - 1`).
  """

  flip: Any
  classes: Any
  box: Any


def draw_dn_noise(rng, shape, num_classes, noise_scale):
  """The DN noise of normal training, drawn with JAX's RNG for slots of `shape` (B, S) -> DnNoise.

  One uniform draw (B, S, 6) for everything (each separate threefry call adds compile time on XLA:CPU):
  [..., 0] label flip, [..., 1] replacement class, [..., 2:6] box noise.
  """
  u = jax.random.uniform(rng, (*shape, 6))
  flip = u[..., 0] < noise_scale * 0.5
  classes = jnp.minimum((u[..., 1] * num_classes).astype(jnp.int32), num_classes - 1)
  return DnNoise(flip, classes, u[..., 2:] * 2.0 - 1.0)


def dn_queries(noise, labels, boxes, info, noise_scale, label_enc):
  """Noised DN content and anchors.

  noise: DnNoise (B, S, ...) (`draw_dn_noise` in training; the official code's recorded draws in the parity
  tests). labels (B, G) int, boxes (B, G, 4) cxcywh, info from dn_layout, label_enc: callable (B, S) int -> (B, S, d).
  Label noise: where noise.flip, noise.classes. Box noise with u = noise.box in [-1, 1]:
  centre += u * wh / 2 * scale, wh += u * wh * scale, clamp to [0, 1]. Non-positive slots: content 0, anchor 0.
  Returns content (B, S, d), anchors (B, S, 4) in logit space.
  """
  t = info.gt_index  # (B, S)
  lab = jnp.take_along_axis(labels, t, axis=1)  # (B, S)
  box = jnp.take_along_axis(boxes, t[..., None], axis=1)  # (B, S, 4)
  lab = jnp.where(noise.flip, noise.classes, lab)
  if noise_scale > 0:
    diff = jnp.concatenate([box[..., 2:] / 2, box[..., 2:]], -1)  # (B, S, 4)
    box = jnp.clip(box + noise.box * diff * noise_scale, 0.0, 1.0)
  pos = info.positive[..., None]
  content = jnp.where(pos, label_enc(lab), 0.0)
  anchors = jnp.where(pos, inverse_sigmoid(box), 0.0)
  return content, anchors
