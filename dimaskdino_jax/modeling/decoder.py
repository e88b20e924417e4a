"""The deformable decoder layer (`DeformableTransformerDecoderLayer`, reference 1.6), post-norm.

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
    q = tgt + query_pos
    sa = MultiheadAttention(self.dim, self.num_heads, name='self_attn')(q, q, tgt, attn_mask)
    tgt = nn.LayerNorm(epsilon=1e-5, name='norm2')(tgt + sa)
    ref_levels = ref[:, :, None, :].repeat(self.num_levels, axis=2)  # (B, Q, L, 4): same box for every level
    ca = MSDeformAttn(self.dim, self.num_levels, self.num_heads, self.num_points, self.impl, name='cross_attn')(
      tgt + query_pos, ref_levels, memory, spatial_shapes
    )
    tgt = nn.LayerNorm(epsilon=1e-5, name='norm1')(tgt + ca)
    return FFN(self.dim, self.ffn_dim, norm_name='norm3', name='ffn')(tgt)
