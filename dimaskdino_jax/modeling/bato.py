"""Balance-Aware Tokens Optimization (BATO): guiding tokens + cross-attention T_i -> T_bal (paper Eq. 5-8;
docs/architecture.md, "Guiding-token generation and BATO").

Official (`Query_Guide_Feature_Update`): the feature tokens are the query (memory + sine position), the
guiding tokens key and value: K = mask tokens + box tokens, V = mask tokens, where mask tokens are the shared
mask MLP of the guiding queries and box tokens their decoder query positions. Then residual + `norm1`, FFN +
`norm2`. Paper: separate 3-layer mask and box networks, T_g = T_g^mask + T_g^box, T_bal = MHCA(T_i, T_g)
(K = V = T_g). Without guiding-token generation (GTG off) the guiding queries are used directly.
"""

import flax.linen as nn

from dimaskdino_jax.modeling.layers import FFN, MLP, MultiheadAttention


class BATO(nn.Module):
  """`guiding_tokens` (guiding-token generation) then `__call__` (the cross-attention that optimizes T_i)."""

  dim: int
  num_heads: int
  ffn_dim: int
  formulation: str = 'official'
  guiding_token_generation: bool = True

  def setup(self):
    if self.guiding_token_generation and self.formulation == 'paper':
      self.mask_net = MLP(hidden_dim=self.dim, output_dim=self.dim, num_layers=3)
      self.box_net = MLP(hidden_dim=self.dim, output_dim=self.dim, num_layers=3)
    self.multihead_attn = MultiheadAttention(dim=self.dim, num_heads=self.num_heads)
    self.norm1 = nn.LayerNorm(epsilon=1e-5)
    self.ffn = FFN(dim=self.dim, ffn_dim=self.ffn_dim, norm_name='norm2')

  def guiding_tokens(self, guide, guide_pos, mask_embed):
    """Guiding-token generation (paper Eq. 5-7): guiding queries guide (B, n, d), their position queries guide_pos
    (B, n, d) and the shared mask MLP `mask_embed` -> key, value (B, n, d) of the attention in `__call__`."""
    if not self.guiding_token_generation:
      return guide + guide_pos, guide
    if self.formulation == 'official':
      mask_tokens = mask_embed(guide)  # the shared mask MLP, no decoder_norm
      return mask_tokens + guide_pos, mask_tokens
    guiding = self.mask_net(guide) + self.box_net(guide)  # T_g = T_g^mask + T_g^box
    return guiding, guiding

  def __call__(self, memory, memory_pos, key, value):
    """T_bal = FFN(norm1(T_i + MHCA(T_i + pos, key, value))) (paper Eq. 8): memory (B, S, d), memory_pos (S, d) or
    (B, S, d), key / value (B, n, d) from `guiding_tokens` -> (B, S, d)."""
    attended = self.multihead_attn(memory + memory_pos, key, value)
    return self.ffn(self.norm1(memory + attended))
