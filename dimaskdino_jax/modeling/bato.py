"""Balance-Aware Tokens Optimization (BATO): guiding tokens + cross-attention T_i -> T_bal (reference 2.2;
paper Eq. 5-8).

Official (`Query_Guide_Feature_Update`): the feature tokens are the query (memory + sine position), the
guiding tokens key and value: K = mask tokens + box tokens, V = mask tokens, where mask tokens are the shared
mask MLP of the guiding queries and box tokens their decoder query positions. Then residual + `norm1`, FFN +
`norm2`. Paper: separate 3-layer mask and box networks, T_g = T_g^mask + T_g^box, T_bal = MHCA(T_i, T_g)
(K = V = T_g). Without guiding-token generation (GTG off) the guiding queries are used directly.
"""

import flax.linen as nn

from dimaskdino_jax.modeling.layers import FFN, MLP, MultiheadAttention


class BATO(nn.Module):
  """memory (B, S, d), memory_pos (S, d) or (B, S, d), guide (B, n, d), guide_pos (B, n, d) -> (B, S, d)."""

  dim: int
  num_heads: int
  ffn_dim: int
  formulation: str = 'official'
  guiding_token_generation: bool = True

  @nn.compact
  def __call__(self, memory, memory_pos, guide, guide_pos, mask_embed):
    if not self.guiding_token_generation:
      key, value = guide + guide_pos, guide
    elif self.formulation == 'official':
      mask_tokens = mask_embed(guide)  # the shared mask MLP, no decoder_norm
      key, value = mask_tokens + guide_pos, mask_tokens
    else:
      t_g = MLP(self.dim, self.dim, 3, name='mask_net')(guide) + MLP(self.dim, self.dim, 3, name='box_net')(guide)
      key, value = t_g, t_g
    attn = MultiheadAttention(self.dim, self.num_heads, name='multihead_attn')(memory + memory_pos, key, value)
    memory = nn.LayerNorm(epsilon=1e-5, name='norm1')(memory + attn)
    return FFN(self.dim, self.ffn_dim, norm_name='norm2', name='ffn')(memory)
