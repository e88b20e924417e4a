"""MaskDINOEncoder (the pixel decoder): input projections, 6 post-norm deformable encoder layers, 1/4 mask branch.

docs/architecture.md, "Pixel decoder". Encoder level order is high-resolution first: [1/8, 1/16, 1/32, 1/64, ...];
the extra levels come from stride-2 3x3 convs, the first on the raw res5 map, later ones on the previous extra level.
Returns (mask_features (B, H/4, W/4, d), multi_scale [(B, H/8, W/8, d), ..., (B, H/64, W/64, d)]).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from dimaskdino_jax.modeling.deformable import MSDeformAttn
from dimaskdino_jax.modeling.layers import FFN, Conv, c2_xavier_fill, conv_padding, xavier_uniform, zeros
from dimaskdino_jax.modeling.position import sine_embedding_2d


def flatten_levels(maps):
  """[(B, H_l, W_l, C)] -> (B, sum H_l W_l, C), spatial shapes ((H_l, W_l), ...)."""
  shapes = tuple((level.shape[1], level.shape[2]) for level in maps)
  flat = jnp.concatenate([level.reshape(level.shape[0], -1, level.shape[-1]) for level in maps], axis=1)
  return flat, shapes


def split_levels(flat, shapes):
  """Inverse of flatten_levels."""
  out, start = [], 0
  for h, w in shapes:
    out.append(flat[:, start : start + h * w].reshape(flat.shape[0], h, w, flat.shape[-1]))
    start += h * w
  return out


def encoder_reference_points(shapes):
  """Normalized pixel centres ((j + 0.5) / W, (i + 0.5) / H) of every level, row-major: (S, 2) as (x, y)."""
  pts = []
  for h, w in shapes:
    ys, xs = jnp.meshgrid((jnp.arange(h) + 0.5) / h, (jnp.arange(w) + 0.5) / w, indexing='ij')
    pts.append(jnp.stack([xs.reshape(-1), ys.reshape(-1)], -1))
  return jnp.concatenate(pts, 0).astype(jnp.float32)


def resize_bilinear(x, hw):
  """torch F.interpolate(mode='bilinear', align_corners=False) on NHWC (no antialiasing)."""
  return jax.image.resize(x, (x.shape[0], hw[0], hw[1], x.shape[-1]), 'bilinear', antialias=False)


class EncoderLayer(nn.Module):
  """Post-norm: src = norm1(src + MSDeformAttn(src + pos, ref, src)); src = norm2(src + FFN(src))."""

  dim: int
  num_levels: int
  num_heads: int
  num_points: int
  ffn_dim: int
  impl: str = 'auto'

  @nn.compact
  def __call__(self, src, pos, reference_points, spatial_shapes):
    self_attention = MSDeformAttn(
      dim=self.dim,
      num_levels=self.num_levels,
      num_heads=self.num_heads,
      num_points=self.num_points,
      impl=self.impl,
      name='self_attn',
    )
    attended = self_attention(src + pos, reference_points, src, spatial_shapes)
    src = nn.LayerNorm(epsilon=1e-5, name='norm1')(src + attended)
    return FFN(dim=self.dim, ffn_dim=self.ffn_dim, norm_name='norm2', name='ffn')(src)


class PixelDecoder(nn.Module):
  """features {'res2'..'res5'} NHWC -> (mask_features, [multi-scale maps in encoder order])."""

  dim: int = 256
  num_layers: int = 6
  num_heads: int = 8
  num_points: int = 4
  ffn_dim: int = 2048
  total_levels: int = 4
  num_groups: int = 32
  impl: str = 'auto'
  remat: bool = False

  @nn.compact
  def __call__(self, features):
    group_norm = lambda name: nn.GroupNorm(num_groups=self.num_groups, epsilon=1e-5, name=name)  # noqa: E731
    srcs, pos_shapes = [], []
    for i, key in enumerate(('res3', 'res4', 'res5')):
      x = Conv(self.dim, (1, 1), kernel_init=xavier_uniform, bias_init=zeros, name=f'input_proj_{i}_conv')(
        features[key]
      )
      srcs.append(group_norm(f'input_proj_{i}_norm')(x))
      pos_shapes.append(features[key].shape[1:3])
    x = features['res5']
    for i in range(3, self.total_levels):
      x = Conv(
        self.dim,
        (3, 3),
        strides=(2, 2),
        padding=conv_padding(3),
        kernel_init=xavier_uniform,
        bias_init=zeros,
        name=f'input_proj_{i}_conv',
      )(x)
      x = group_norm(f'input_proj_{i}_norm')(x)
      srcs.append(x)
      pos_shapes.append(x.shape[1:3])
    level_embed = self.param('level_embed', nn.initializers.normal(1.0), (self.total_levels, self.dim))
    pos = [
      (sine_embedding_2d(h, w, self.dim // 2) + level_embed[lvl]).reshape(h * w, self.dim)
      for lvl, (h, w) in enumerate(pos_shapes)
    ]
    pos = jnp.concatenate(pos, 0)[None]  # (1, S, d)
    src, shapes = flatten_levels(srcs)  # (B, S, d)
    ref = jnp.broadcast_to(encoder_reference_points(shapes)[:, None, :], (src.shape[1], len(shapes), 2))
    ref = jnp.broadcast_to(ref[None], (src.shape[0], *ref.shape))  # (B, S, L, 2)
    layer_cls = nn.remat(EncoderLayer, static_argnums=(4,)) if self.remat else EncoderLayer
    for i in range(self.num_layers):
      layer = layer_cls(
        dim=self.dim,
        num_levels=len(shapes),
        num_heads=self.num_heads,
        num_points=self.num_points,
        ffn_dim=self.ffn_dim,
        impl=self.impl,
        name=f'encoder_layers_{i}',
      )
      src = layer(src, pos, ref, shapes)
    outs = split_levels(src, shapes)  # [1/8, 1/16, 1/32, 1/64, ...]

    # 1/4 mask branch: adapter_1(res2) + upsampled 1/8 map, layer_1 (3x3 + GN + ReLU), mask_features (1x1 + bias).
    res2 = features['res2']
    y = Conv(self.dim, (1, 1), use_bias=False, kernel_init=c2_xavier_fill(), name='adapter_1')(res2)
    y = group_norm('adapter_1_norm')(y)
    y = y + resize_bilinear(outs[0], res2.shape[1:3])
    y = Conv(self.dim, (3, 3), padding=conv_padding(3), use_bias=False, kernel_init=c2_xavier_fill(), name='layer_1')(y)
    y = nn.relu(group_norm('layer_1_norm')(y))
    mask_features = Conv(self.dim, (1, 1), kernel_init=c2_xavier_fill(), bias_init=zeros, name='mask_features')(y)
    return mask_features, outs
