"""Building blocks with PyTorch-compatible semantics: Linear/Conv inits, MLP, FFN, multi-head attention.

Weights are laid out the Flax way (kernels (in, out), convs (kh, kw, in, out)); the converter transposes.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

xavier_uniform = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros


def torch_linear_kernel_init():
  """torch.nn.Linear default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  return nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def torch_linear_bias_init(fan_in):
  """torch.nn.Linear default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def c2_xavier_fill():
  """detectron2/fvcore c2_xavier_fill: kaiming_uniform(a=1) = U(-sqrt(3/fan_in), sqrt(3/fan_in)), zero bias."""
  return nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform')


class DenseBiasApart(nn.Module):
  """`nn.Dense` (same parameters: names, shapes, initializers, creation order) returning `(x @ kernel, bias)` with
  the bias not added, for a consumer that adds it itself (the deformable attention's value: kernels/ms_deform_attn/
  xla.py says why)."""

  features: int
  kernel_init: nn.initializers.Initializer = xavier_uniform
  bias_init: nn.initializers.Initializer = zeros

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', self.kernel_init, (x.shape[-1], self.features))
    bias = self.param('bias', self.bias_init, (self.features,))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias)
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ()))), bias


class MLP(nn.Module):
  """`MLP(i, h, o, n)` of the official code: n Linear layers, ReLU between, none after the last.

  Params `layers_{k}` mirror `layers.{k}`. `zero_last` zero-inits the last layer (the box MLPs).
  """

  hidden_dim: int
  output_dim: int
  num_layers: int
  zero_last: bool = False

  @nn.compact
  def __call__(self, x):
    for k in range(self.num_layers):
      last = k == self.num_layers - 1
      feats = self.output_dim if last else self.hidden_dim
      init = dict(kernel_init=zeros, bias_init=zeros) if (last and self.zero_last) else {}
      x = nn.Dense(
        feats,
        kernel_init=init.get('kernel_init', torch_linear_kernel_init()),
        bias_init=init.get('bias_init', torch_linear_bias_init(x.shape[-1])),
        name=f'layers_{k}',
      )(x)
      if not last:
        x = nn.relu(x)
    return x


class FFN(nn.Module):
  """Post-norm FFN block: x + linear2(relu(linear1(x))), then LayerNorm `norm` (eps 1e-5). Dropout is 0."""

  dim: int
  ffn_dim: int
  norm_name: str = 'norm'

  @nn.compact
  def __call__(self, x):
    y = nn.Dense(self.ffn_dim, kernel_init=xavier_uniform, bias_init=torch_linear_bias_init(self.dim), name='linear1')(
      x
    )
    y = nn.Dense(self.dim, kernel_init=xavier_uniform, bias_init=torch_linear_bias_init(self.ffn_dim), name='linear2')(
      nn.relu(y)
    )
    return nn.LayerNorm(epsilon=1e-5, name=self.norm_name)(x + y)


class MultiheadAttention(nn.Module):
  """torch.nn.MultiheadAttention (batch-first here): q/k/v projections, heads as contiguous channel blocks,
  q scaled by 1/sqrt(head_dim), boolean `mask` True = blocked (-inf), then `out_proj`.

  Params: q_proj, k_proj, v_proj (the rows [0:d], [d:2d], [2d:3d] of torch's in_proj), out_proj.
  query (B, Lq, d), key (B, Lk, d), value (B, Lk, d), mask (Lq, Lk) or (B, Lq, Lk) -> (B, Lq, d).
  """

  dim: int
  num_heads: int

  @nn.compact
  def __call__(self, query, key, value, mask=None):
    d, h = self.dim, self.num_heads
    hd = d // h
    proj = lambda name: nn.Dense(d, kernel_init=xavier_uniform, bias_init=zeros, name=name)  # noqa: E731
    q = proj('q_proj')(query).reshape(*query.shape[:-1], h, hd)  # (B, Lq, H, hd)
    k = proj('k_proj')(key).reshape(*key.shape[:-1], h, hd)
    v = proj('v_proj')(value).reshape(*value.shape[:-1], h, hd)
    q = q * (1.0 / math.sqrt(hd))
    logits = jnp.einsum('bqhc,bkhc->bhqk', q, k)  # (B, H, Lq, Lk)
    if mask is not None:
      blocked = mask if mask.ndim == 3 else mask[None]  # (B or 1, Lq, Lk)
      logits = jnp.where(blocked[:, None], -jnp.inf, logits)
    attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum('bhqk,bkhc->bqhc', attn, v).reshape(*query.shape[:-1], d)
    return nn.Dense(d, kernel_init=torch_linear_kernel_init(), bias_init=zeros, name='out_proj')(out)


def conv_padding(kernel: int):
  """Explicit symmetric padding of torch Conv2d(padding=kernel // 2)."""
  p = kernel // 2
  return ((p, p), (p, p))
