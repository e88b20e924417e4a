"""MSDeformAttn: the projections around `kernels.ms_deform_attn` (docs/architecture.md, "Deformable attention").

Param names mirror the official module: value_proj, sampling_offsets, attention_weights, output_proj.
Output layouts are kept: sampling_offsets out index = ((head * L + level) * P + point) * 2 + xy and
attention_weights out index = (head * L + level) * P + point, so conversion is a plain transpose.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dimaskdino_jax.modeling.layers import Dense, DenseBiasApart, xavier_uniform, zeros
from kernels.ms_deform_attn import ms_deform_attn


def sampling_offsets_bias_init(num_heads, num_levels, num_points):
  """Head h points along (cos, sin)(2*pi*h/M) scaled to max-abs 1, times (p + 1) for point p; same per level."""

  def init(key, shape, dtype=jnp.float32):
    del key
    thetas = np.arange(num_heads, dtype=np.float64) * (2.0 * math.pi / num_heads)
    grid = np.stack([np.cos(thetas), np.sin(thetas)], -1)  # (M, 2)
    grid = grid / np.abs(grid).max(-1, keepdims=True)
    grid = np.tile(grid[:, None, None, :], (1, num_levels, num_points, 1))  # (M, L, P, 2)
    grid = grid * np.arange(1, num_points + 1, dtype=np.float64)[None, None, :, None]
    out = jnp.asarray(grid.reshape(-1), dtype)
    assert out.shape == tuple(shape), (out.shape, shape)
    return out

  return init


class MSDeformAttn(nn.Module):
  """Multi-scale deformable attention.

  query (B, Lq, d); reference_points (B, Lq, L, 2) normalized centres or (B, Lq, L, 4) boxes (cx, cy, w, h);
  value_input (B, S, d); spatial_shapes: static ((H_0, W_0), ...) in the value's level order -> (B, Lq, d).
  """

  dim: int = 256
  num_levels: int = 4
  num_heads: int = 8
  num_points: int = 4
  impl: str = 'auto'

  @nn.compact
  def __call__(self, query, reference_points, value_input, spatial_shapes):
    b, lq, _ = query.shape
    m, lv, p = self.num_heads, self.num_levels, self.num_points
    assert len(spatial_shapes) == lv, (spatial_shapes, lv)
    # The value projection's bias is handed to the op, which adds it to each sampled row (faster on XLA:CPU).
    value, value_bias = DenseBiasApart(self.dim, xavier_uniform, zeros, name='value_proj')(value_input)
    value = value.reshape(b, value.shape[1], m, self.dim // m)  # (B, S, M, D) without the bias
    offsets = Dense(
      m * lv * p * 2,
      kernel_init=zeros,
      bias_init=sampling_offsets_bias_init(m, lv, p),
      name='sampling_offsets',
    )(query).reshape(b, lq, m, lv, p, 2)
    weights = Dense(m * lv * p, kernel_init=zeros, bias_init=zeros, name='attention_weights')(query)
    weights = jax.nn.softmax(weights.reshape(b, lq, m, lv * p), axis=-1).reshape(b, lq, m, lv, p)
    if reference_points.shape[-1] == 2:
      normalizer = jnp.array([[w, h] for h, w in spatial_shapes], jnp.float32)  # (L, 2) as (W, H)
      loc = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    else:
      ref = reference_points[:, :, None, :, None, :]  # (B, Lq, 1, L, 1, 4)
      loc = ref[..., :2] + offsets / p * ref[..., 2:] * 0.5
    starts = tuple(int(s) for s in np.cumsum([0] + [h * w for h, w in spatial_shapes])[:-1])
    bias = value_bias.reshape(m, self.dim // m)  # (M, D)
    out = ms_deform_attn(value, tuple(spatial_shapes), starts, loc, weights, impl=self.impl, value_bias=bias)
    # out: (B, Lq, d)
    return Dense(self.dim, kernel_init=xavier_uniform, bias_init=zeros, name='output_proj')(out)
