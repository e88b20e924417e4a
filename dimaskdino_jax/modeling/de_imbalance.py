"""De-Imbalance (DI): residual double selection -> balance-aware query Q_bal (paper Eq. 1-4; docs/architecture.md,
"Token interaction and second selection", and docs/official_vs_paper.md, "De-Imbalance").

Official formulation (`Object_Level_Detection_Module`, attribute `oldm`): the k1 tokens selected from the
encoder run through `ti_layers` token-interaction layers (self-attention + FFN, post-norm) with iterative box
refinement and deep supervision; the second selection keeps the top-k2 by class score of the *un-normed* last
output and of the last *non-detached* refined box. Paper formulation adds Eq. 4: Q_bal = MHCA(T_s2, T_i), a
residual cross-attention from the selected tokens back to all encoder tokens (with self-attention and FFN).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from dimaskdino_jax.box_ops import inverse_sigmoid
from dimaskdino_jax.modeling.layers import FFN, MLP, MultiheadAttention
from dimaskdino_jax.modeling.position import box_sine_embedding


class TokenInteractionLayer(nn.Module):
  """out = norm1(x + MHA(x + pos, x + pos, x)); out = norm2(out + FFN(out)). x (B, K, d)."""

  dim: int
  num_heads: int
  ffn_dim: int

  @nn.compact
  def __call__(self, x, pos):
    query = x + pos
    x = nn.LayerNorm(epsilon=1e-5, name='norm1')(
      x + MultiheadAttention(dim=self.dim, num_heads=self.num_heads, name='self_attn')(query, query, x)
    )
    return FFN(dim=self.dim, ffn_dim=self.ffn_dim, norm_name='norm2', name='ffn')(x)


class DeImbalanceStage(nn.Module):
  """Token interaction between two selections.

  tgt (B, K, d) content, ref_logits (B, K, 4) unsigmoided anchors. Returns
  (out_raw (B, K, d) last un-normed output, new_ref (B, K, 4) last refined boxes, not detached,
   aux_normed (T, B, K, d) = oldm_norm(out_i), aux_boxes (T, B, K, 4) with the official double delta).
  """

  dim: int
  num_layers: int
  num_heads: int
  ffn_dim: int

  def setup(self):
    self.layers = [
      TokenInteractionLayer(dim=self.dim, num_heads=self.num_heads, ffn_dim=self.ffn_dim)
      for _ in range(self.num_layers)
    ]
    self.ref_point_head = MLP(hidden_dim=self.dim, output_dim=self.dim, num_layers=2)
    self.norm = nn.LayerNorm(epsilon=1e-5)  # oldm_norm
    # _oldm_bbox_embed, shared by all TI layers
    self.bbox_embed = MLP(hidden_dim=self.dim, output_dim=4, num_layers=3, zero_last=True)

  def query_pos(self, ref):
    """ref_point_head(sine(ref)): ref (B, K, 4) sigmoid boxes -> (B, K, d)."""
    return self.ref_point_head(box_sine_embedding(ref, self.dim // 2))

  def __call__(self, tgt, ref_logits):
    ref = jax.nn.sigmoid(ref_logits)
    out = tgt
    normed, boxes = [], []
    new_ref = ref
    for layer in self.layers:
      out = layer(out, self.query_pos(ref))
      new_ref = jax.nn.sigmoid(self.bbox_embed(out) + inverse_sigmoid(ref))
      ref = jax.lax.stop_gradient(new_ref)
      out_normed = self.norm(out)
      normed.append(out_normed)
      # Quirk: the aux box adds a second delta (from the normed output) on top of the refined box.
      boxes.append(jax.nn.sigmoid(self.bbox_embed(out_normed) + inverse_sigmoid(new_ref)))
    return out, new_ref, jnp.stack(normed), jnp.stack(boxes)


class ResidualCrossAttention(nn.Module):
  """Paper Eq. 4: Q_bal = MHCA(T_s2, T_i) with a self-attention and an FFN (post-norm, residual)."""

  dim: int
  num_heads: int
  ffn_dim: int

  @nn.compact
  def __call__(self, x, pos, memory, memory_pos):
    query = x + pos
    x = nn.LayerNorm(epsilon=1e-5, name='norm1')(
      x + MultiheadAttention(dim=self.dim, num_heads=self.num_heads, name='self_attn')(query, query, x)
    )
    cross_attention = MultiheadAttention(dim=self.dim, num_heads=self.num_heads, name='cross_attn')
    attended = cross_attention(x + pos, memory + memory_pos, memory)
    x = nn.LayerNorm(epsilon=1e-5, name='norm2')(x + attended)
    return FFN(dim=self.dim, ffn_dim=self.ffn_dim, norm_name='norm3', name='ffn')(x)
