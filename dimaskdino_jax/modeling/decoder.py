"""The deformable decoder layer (`DeformableTransformerDecoderLayer`; docs/architecture.md, "Decoder"), post-norm.

Order: self-attention (q = k = tgt + query_pos, v = tgt, DN mask) -> `norm2`; deformable cross-attention
(query = tgt + query_pos, 4-d box references, value = memory) -> `norm1`; FFN -> `norm3`. The odd norm
names are the official ones.
"""

import flax.linen as nn

from dimaskdino_jax.modeling.deformable import MSDeformAttn
from dimaskdino_jax.modeling.layers import FFN, MultiheadAttention


class DecoderLayer(nn.Module):
  """tgt (B, Q, d), query_pos (B, Q, d), ref (B, Q, 4) sigmoid boxes, memory (B, S, d) -> (B, Q, d)."""

  dim: int
  num_levels: int
  num_heads: int
  num_points: int
  ffn_dim: int
  impl: str = 'auto'

  @nn.compact
  def __call__(self, tgt, query_pos, ref, memory, attn_mask, spatial_shapes):
    query = tgt + query_pos
    attended = MultiheadAttention(dim=self.dim, num_heads=self.num_heads, name='self_attn')(
      query, query, tgt, attn_mask
    )
    tgt = nn.LayerNorm(epsilon=1e-5, name='norm2')(tgt + attended)
    ref_levels = ref[:, :, None, :].repeat(self.num_levels, axis=2)  # (B, Q, L, 4): same box for every level
    cross_attention = MSDeformAttn(
      dim=self.dim,
      num_levels=self.num_levels,
      num_heads=self.num_heads,
      num_points=self.num_points,
      impl=self.impl,
      name='cross_attn',
    )
    sampled = cross_attention(tgt + query_pos, ref_levels, memory, spatial_shapes)
    tgt = nn.LayerNorm(epsilon=1e-5, name='norm1')(tgt + sampled)
    return FFN(dim=self.dim, ffn_dim=self.ffn_dim, norm_name='norm3', name='ffn')(tgt)
