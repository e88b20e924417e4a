"""Typed containers for the model's outputs (docs/architecture.md, "Outputs" and "Denoising queries").

Shapes: B batch, Q matching queries (k2), K first-selection tokens (k1, or Q without DI), C classes,
N = decoder layers (+1 with the initial prediction), T token-interaction layers, S DN slots (`dn.num`),
(Hm, Wm) mask-feature map size (1/4 of the canvas). Boxes are sigmoid-space cxcywh of the padded canvas.
"""

from typing import Any

import flax.struct
import jax.numpy as jnp

Array = Any


@flax.struct.dataclass
class HeadOutputs:
  """Predictions of one or several stacked sets of queries.

  logits: (..., B, Q, C) class logits (sigmoid / focal, no background logit).
  boxes:  (..., B, Q, 4) cxcywh in [0, 1].
  masks:  (..., B, Q, Hm, Wm) mask logits at 1/4 resolution, or None where not computed.
  """

  logits: Array
  boxes: Array
  masks: Array | None = None

  def layer(self, i):
    """The i-th entry of a stacked set (leading layer axis)."""
    return HeadOutputs(self.logits[i], self.boxes[i], None if self.masks is None else self.masks[i])


@flax.struct.dataclass
class DenoisingInfo:
  """The static-shape DN layout (docs/architecture.md, "Denoising queries") that the criterion needs for the fixed
  assignment.

  slot_active: (S,) bool. Slot s < num_groups * single_pad (the official `pad_size`); inactive slots are
    padding that the official code does not have: they see only themselves and get no loss.
  gt_index:    (B, S) int32. The GT index t = s % single_pad that slot s reconstructs.
  positive:    (B, S) bool. Slot active and t < number of GT of the image (a DN positive).
  num_groups:  () int32. `scalar = dn_num // max_gt` (0 when DN is skipped this step).
  """

  slot_active: Array
  gt_index: Array
  positive: Array
  num_groups: Array


def mask_logits(embeds, mask_features):
  """The heads' masks: embeds (B, N, d) . mask_features (B, Hm, Wm, d) over d -> (B, N, Hm, Wm) logits."""
  return jnp.einsum('bqc,bhwc->bqhw', embeds, mask_features)


@flax.struct.dataclass
class MaskFactors:
  """The two factors of the training-mode masks, for losses that need the masks of a few queries only.

  Every mask the heads return is `embeds . features` over d: masks[l, b, q] = einsum(embeds[l, b, q],
  features[feature_index[l], b]). The criterion's point-sampled mask losses gather the embeddings of the matched
  queries (and DN slots) and form only those masks, so the backward pass runs over those few queries instead of
  the dense (N, B, N_dn + Q, Hm, Wm) masks (whose values then serve the matcher only, without gradient).

  embeds:        (N, B, N_dn + Q, d) mask_embed(decoder_norm(x)) of each entry of `layers` / `dn`, DN slots first.
  interm_embeds: (B, K, d) the same for the encoder selection's predictions (their features: features[0]).
  features:      (F, B, Hm, Wm, d) the distinct mask-feature maps: F first, then F' after BATO (F = 1 or 2).
  feature_index: (N,) static tuple: the map each entry of `layers` / `dn` uses.
  num_dn:        static, N_dn (0 without DN).
  """

  embeds: Array
  interm_embeds: Array
  features: Array
  feature_index: tuple = flax.struct.field(pytree_node=False)
  num_dn: int = flax.struct.field(pytree_node=False, default=0)


@flax.struct.dataclass
class Predictions:
  """Everything the model returns.

  layers:  HeadOutputs stacked over N = [initial prediction, decoder layer 0, ..., L-1] (matching queries).
           In inference mode masks are computed for the last entry only (masks: (1, B, Q, Hm, Wm)).
  interm:  HeadOutputs of the encoder (two-stage) selection, (B, K, ...).
  di_aux:  HeadOutputs stacked over the token-interaction layers, (T, B, K, ...), masks None; None without DI.
  di_aux_more: the same for later DI stages with three or more selections (token counts k2, k3, ...).
  dn:      HeadOutputs stacked like `layers` over the DN slots, (N, B, S, ...); None without DN.
  dn_info: DenoisingInfo or None.
  extras:  dict of intermediate tensors for analysis and parity tests (selected indices, DI/BATO tensors).
  mask_factors: MaskFactors of the masks in training mode (all layers' masks computed), else None.
  """

  layers: HeadOutputs
  interm: HeadOutputs
  di_aux: HeadOutputs | None = None
  di_aux_more: tuple = ()
  dn: HeadOutputs | None = None
  dn_info: DenoisingInfo | None = None
  extras: dict = flax.struct.field(default_factory=dict)
  mask_factors: MaskFactors | None = None

  @property
  def final(self) -> HeadOutputs:
    """The last decoder layer's predictions (B, Q, ...)."""
    return self.layers.layer(-1)

  @property
  def num_layers(self) -> int:
    return self.layers.logits.shape[0]


def zeros_like_head(b, q, c, mask_hw=None, dtype=jnp.float32) -> HeadOutputs:
  """Zero HeadOutputs of the given sizes (used for shape-only placeholders in tests)."""
  masks = None if mask_hw is None else jnp.zeros((b, q, *mask_hw), dtype)
  return HeadOutputs(jnp.zeros((b, q, c), dtype), jnp.zeros((b, q, 4), dtype), masks)
