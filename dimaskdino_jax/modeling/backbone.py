"""detectron2 ResNet (`build_resnet_backbone`) with FrozenBatchNorm, returning res2..res5 (docs/architecture.md,
"Backbone").

NHWC. Bottleneck blocks (ResNet-50/101) put the stride on the 3x3 conv (STRIDE_IN_1X1=False); BasicBlocks
(ResNet-18/34) on the first 3x3. FrozenBN statistics live in the non-trainable collection `frozen_bn` as
(weight, bias, running_mean, running_var), so checkpoints convert as a table and nothing trains them.
`freeze_at` k stops gradients after the stem (k >= 1) and after res2..res{k} (k >= 2), like detectron2.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from dimaskdino_jax.modeling.layers import Conv, conv_padding, max_pool

STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}

# c2_msra_fill: kaiming_normal(fan_out, relu) for every backbone conv.
msra_fill = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class FrozenBatchNorm(nn.Module):
  """y = (x - running_mean) / sqrt(running_var + eps) * weight + bias with fixed buffers."""

  eps: float = 1e-5

  @nn.compact
  def __call__(self, x):
    channels = x.shape[-1]
    weight = self.variable('frozen_bn', 'weight', lambda: jnp.ones((channels,), jnp.float32)).value
    bias = self.variable('frozen_bn', 'bias', lambda: jnp.zeros((channels,), jnp.float32)).value
    running_mean = self.variable('frozen_bn', 'running_mean', lambda: jnp.zeros((channels,), jnp.float32)).value
    running_var = self.variable('frozen_bn', 'running_var', lambda: jnp.ones((channels,), jnp.float32)).value
    scale = weight * jax.lax.rsqrt(running_var + self.eps)
    shift = bias - running_mean * scale
    return (x * scale.astype(x.dtype) + shift.astype(x.dtype)).astype(x.dtype)


class ConvNorm(nn.Module):
  """detectron2 Conv2d(bias=False, norm=...): params `conv`, then `norm` = FrozenBN (stats in `frozen_bn`) or
  GroupNorm (learned; detectron2's NORM='GN', for training from scratch)."""

  features: int
  kernel: int
  stride: int = 1
  dtype: jnp.dtype = jnp.float32
  norm: str = 'FrozenBN'
  norm_groups: int = 32

  @nn.compact
  def __call__(self, x):
    x = Conv(
      self.features,
      (self.kernel, self.kernel),
      strides=(self.stride, self.stride),
      padding=conv_padding(self.kernel),
      use_bias=False,
      kernel_init=msra_fill,
      dtype=self.dtype,
      name='conv',
    )(x)
    if self.norm == 'GN':
      return nn.GroupNorm(num_groups=min(self.norm_groups, self.features), epsilon=1e-5, name='norm')(x)
    return FrozenBatchNorm(name='norm')(x)


class _Block(nn.Module):
  """Shared fields of the residual blocks; `conv(...)` is a ConvNorm with the block's dtype and norm."""

  bottleneck: int  # unused by BasicBlock (the signature is shared)
  out_channels: int
  stride: int
  dtype: jnp.dtype = jnp.float32
  norm: str = 'FrozenBN'
  norm_groups: int = 32

  def conv(self, features, kernel, stride, name):
    return ConvNorm(
      features=features,
      kernel=kernel,
      stride=stride,
      dtype=self.dtype,
      norm=self.norm,
      norm_groups=self.norm_groups,
      name=name,
    )

  def shortcut(self, x):
    """Projection shortcut (1x1 conv + norm) when the shape changes, else identity."""
    if x.shape[-1] != self.out_channels or self.stride != 1:
      return self.conv(self.out_channels, kernel=1, stride=self.stride, name='shortcut')(x)
    return x


class BottleneckBlock(_Block):
  @nn.compact
  def __call__(self, x):
    y = nn.relu(self.conv(self.bottleneck, kernel=1, stride=1, name='conv1')(x))
    y = nn.relu(self.conv(self.bottleneck, kernel=3, stride=self.stride, name='conv2')(y))
    y = self.conv(self.out_channels, kernel=1, stride=1, name='conv3')(y)
    return nn.relu(y + self.shortcut(x))


class BasicBlock(_Block):
  @nn.compact
  def __call__(self, x):
    y = nn.relu(self.conv(self.out_channels, kernel=3, stride=self.stride, name='conv1')(x))
    y = self.conv(self.out_channels, kernel=3, stride=1, name='conv2')(y)
    return nn.relu(y + self.shortcut(x))


def stage_channels(depth, width, res2_out_channels):
  """(bottleneck, out) channels of res2..res5."""
  if depth >= 50:
    return [(width * 2**i, res2_out_channels * 2**i) for i in range(4)]
  return [(res2_out_channels * 2**i, res2_out_channels * 2**i) for i in range(4)]


class ResNet(nn.Module):
  """images (B, H, W, 3) normalized float -> {'res2': (B, H/4, W/4, C2), ..., 'res5': (B, H/32, W/32, C5)}."""

  depth: int = 50
  stem_width: int = 64
  width: int = 64
  res2_out_channels: int = 256
  freeze_at: int = 0
  dtype: jnp.dtype = jnp.float32
  norm: str = 'FrozenBN'  # 'FrozenBN' (official) or 'GN'
  norm_groups: int = 32

  @nn.compact
  def __call__(self, x):
    x = x.astype(self.dtype)
    stem = ConvNorm(
      features=self.stem_width,
      kernel=7,
      stride=2,
      dtype=self.dtype,
      norm=self.norm,
      norm_groups=self.norm_groups,
      name='stem',
    )
    x = nn.relu(stem(x))
    x = max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    if self.freeze_at >= 1:
      x = jax.lax.stop_gradient(x)
    block = BottleneckBlock if self.depth >= 50 else BasicBlock
    outs = {}
    channels = stage_channels(self.depth, self.width, self.res2_out_channels)
    for s, (num_blocks, (bottleneck, out_channels)) in enumerate(zip(STAGE_BLOCKS[self.depth], channels)):
      for k in range(num_blocks):
        stride = 2 if (k == 0 and s > 0) else 1
        x = block(
          bottleneck=bottleneck,
          out_channels=out_channels,
          stride=stride,
          dtype=self.dtype,
          norm=self.norm,
          norm_groups=self.norm_groups,
          name=f'res{s + 2}_{k}',
        )(x)
      if self.freeze_at >= s + 2:
        x = jax.lax.stop_gradient(x)
      outs[f'res{s + 2}'] = x.astype(jnp.float32)
    return outs
