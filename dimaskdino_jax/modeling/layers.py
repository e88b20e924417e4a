"""Building blocks with PyTorch-compatible semantics: Linear/Conv inits, MLP, FFN, multi-head attention, max pooling.

Weights are laid out the Flax way (kernels (in, out), convs (kh, kw, in, out)); the converter transposes.
"""

import functools
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


def _linear(x, kernel):
  """x (..., K) @ kernel (K, C) -> (..., C), as nn.Dense computes it."""
  return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


@jax.custom_vjp
def dense(x, kernel, bias):
  """x (..., K) @ kernel (K, C) + bias (C,) (bias None: no bias): nn.Dense's forward, with a gradient that a CPU
  computes as 2-D matrix products.

  XLA:CPU given autodiff's weight gradient (a dot_general contracting x's and dy's leading axes) and bias gradient
  (a reduction over them) copies dy into another layout and splits the reduction into windowed ones; for the
  encoder's FFN at batch 2 and 512 x 512 (10,880 tokens, 256 -> 2,048 -> 256) the forward and backward took 645 ms,
  with the products below 510-560 ms (ad-hoc benchmark, BENCHMARKS.md session 16). Here: dx as autodiff's, dW =
  X^T dY with the narrower operand transposed (`_tn_product`), db = ones^T dY. Other platforms keep autodiff's.
  """
  y = _linear(x, kernel)
  return y if bias is None else y + bias


def _dense_fwd(x, kernel, bias):
  return dense(x, kernel, bias), (x, kernel, bias)


def _dense_grads_by_products(x, kernel, dy):
  """(dx, dW float32, db float32) of `dense` as 2-D products (the CPU's)."""
  (dx,) = jax.vjp(lambda x_: _linear(x_, kernel), x)[1](dy)
  xf, dyf = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])  # (N, K), (N, C)
  dw = _tn_product(xf, dyf, None)  # (K, C)
  db = jnp.matmul(jnp.ones((1, dyf.shape[0]), dyf.dtype), dyf, preferred_element_type=jnp.float32)[0]  # (C,)
  return dx, dw, db


def _dense_grads_by_autodiff(x, kernel, dy):
  """(dx, dW, db float32) of `dense` as autodiff takes them (other platforms)."""
  dx, dw = jax.vjp(_linear, x, kernel)[1](dy)
  return dx, dw, jnp.sum(dy.reshape(-1, dy.shape[-1]), axis=0, dtype=jnp.float32)


def _dense_bwd(residuals, dy):
  x, kernel, bias = residuals
  dx, dw, db = jax.lax.platform_dependent(x, kernel, dy, cpu=_dense_grads_by_products, default=_dense_grads_by_autodiff)
  return dx, dw.astype(kernel.dtype), None if bias is None else db.astype(bias.dtype)


dense.defvjp(_dense_fwd, _dense_bwd)


class Dense(nn.Module):
  """`nn.Dense` (same parameters: names, shapes, initializers, creation order; the same forward) with `dense`'s
  gradient. `bias_apart`: return `(x @ kernel, bias)` with the bias not added, for a consumer that adds it itself
  (the deformable attention's value: kernels/ms_deform_attn/xla.py says why)."""

  features: int
  kernel_init: nn.initializers.Initializer = xavier_uniform
  bias_init: nn.initializers.Initializer = zeros
  bias_apart: bool = False

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', self.kernel_init, (x.shape[-1], self.features))
    bias = self.param('bias', self.bias_init, (self.features,))
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias)
    if self.bias_apart:
      return dense(x, kernel, None), bias
    return dense(x, kernel, bias)


# The value projection of the deformable attention: (x @ kernel, bias).
DenseBiasApart = functools.partial(Dense, bias_apart=True)


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
      x = Dense(
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
    y = Dense(self.ffn_dim, kernel_init=xavier_uniform, bias_init=torch_linear_bias_init(self.dim), name='linear1')(x)
    y = Dense(self.dim, kernel_init=xavier_uniform, bias_init=torch_linear_bias_init(self.ffn_dim), name='linear2')(
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
    proj = lambda name: Dense(d, kernel_init=xavier_uniform, bias_init=zeros, name=name)  # noqa: E731
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
    return Dense(d, kernel_init=torch_linear_kernel_init(), bias_init=zeros, name='out_proj')(out)


def conv_padding(kernel: int):
  """Explicit symmetric padding of torch Conv2d(padding=kernel // 2)."""
  p = kernel // 2
  return ((p, p), (p, p))


# ------------------------------------------------------------------------------------ convolution weight gradient
_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _matmul_wgrad_pays(x_shape, kernel_shape, strides):
  """Whether `conv_general_dilated` takes this NHWC convolution's weight gradient as matrix products: every 1 x 1
  convolution from 64 input channels, and larger kernels from 256 input channels on maps of at least 32,768 output
  pixels (batch included). Measured on the 2-core CPU (BENCHMARKS.md): XLA's weight gradient took 31-77 ms where
  the products took 36-93 ms (3 x 3 convolutions of ResNet's stages at 512 x 512), and 813 ms against 419 ms for
  the 3 x 3 256 -> 256 convolutions at 1/4 scale; the 1 x 1 ones 2-9x faster as products at every size tried."""
  kh, kw, ci, _ = kernel_shape
  out_pixels = x_shape[0] * (x_shape[1] // strides[0]) * (x_shape[2] // strides[1])
  if (kh, kw) == (1, 1):
    return ci >= 64
  return ci >= 256 and out_pixels >= 32768


def conv_general_dilated(
  lhs,
  rhs,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  precision=None,
  **kwargs,
):
  """lax.conv_general_dilated (as nn.Conv's `conv_general_dilated`) whose weight gradient on a CPU is a sum of
  matrix products where that pays (`_matmul_wgrad_pays`).

  The forward pass and the input gradient are lax's, so outputs are unchanged. XLA:CPU takes the weight gradient
  of a convolution as another convolution whose "kernel" is the output map, far below the CPU's matrix-product
  speed for 1 x 1 kernels and for large maps (the R50 training step at 512 x 512: 0.8-1.0 s for each of the two
  3 x 3 256 -> 256 convolutions at 1/4 scale, 39 GFLOP). Here it is one product per kernel tap (i, j):
  dW[i, j] = sum over (b, y, x) of x_pad[b, s*y + i, s*x + j, :]^T dY[b, y, x, :], in float32. NHWC / HWIO
  convolutions without dilation or groups only; on other platforms the gradient stays lax's.
  """
  simple = (
    not kwargs
    and all(d is None or tuple(d) == (1,) * len(d) for d in (lhs_dilation, rhs_dilation))
    and feature_group_count == 1
    and lhs.ndim == 4
    and dimension_numbers == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
  )
  if simple:
    if isinstance(padding, str):
      padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    strides = tuple(int(s) for s in window_strides)
    if strides == (1, 1) and pads == ((0, 0), (0, 0)) and precision is None and _product_1x1_pays(lhs.shape, rhs.shape):
      return _conv_1x1(lhs, rhs)
    if min(min(pair) for pair in pads) >= 0 and _matmul_wgrad_pays(lhs.shape, rhs.shape, strides):
      return _conv_matmul_wgrad(lhs, rhs, strides, pads, precision)
  return jax.lax.conv_general_dilated(
    lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
    precision=precision, **kwargs,
  )  # fmt: skip


# Multiply-adds from which a 1 x 1 convolution is a matrix product (`_product_1x1_pays`).
PRODUCT_1X1_MIN_MACS = 1 << 26


def _product_1x1_pays(x_shape, kernel_shape):
  """Whether a 1 x 1 convolution (stride 1, no padding) runs as `_conv_1x1`: from 2^26 multiply-adds (B*H*W*Ci*Co).
  Every 1 x 1 convolution of the R50 model at 512 x 512 has 2^29 or more and is faster so; the CPU demo's (configs/
  shapes.py: at most 8 x 32 x 32 x 64 x 64 = 2^25) stay lax's: its trainer loop on two host devices ran 3.05 and
  3.21 steps/s with them as products against 3.32 and 3.32 without (benchmarks/train_loop.py, BENCHMARKS.md
  session 18)."""
  if tuple(kernel_shape[:2]) != (1, 1):
    return False
  b, h, w, ci = x_shape
  return b * h * w * ci * kernel_shape[3] >= PRODUCT_1X1_MIN_MACS


def _conv_1x1(x, w):
  """An NHWC 1 x 1 convolution with stride 1 and no padding, x (B, H, W, Ci), w (1, 1, Ci, Co) -> (B, H, W, Co): one
  matrix product (`dense`, whose CPU gradient is products as well).

  XLA:CPU runs 1 x 1 convolutions well below its matrix-product speed on large maps: forward + backward at batch 2
  and 128 x 128, 64 -> 256 channels 147 ms through `_conv_matmul_wgrad` against 63 ms as a product, 256 -> 256 212
  vs 129 ms, with the same bits (`benchmarks/loss_ops.py`, BENCHMARKS.md session 18).
  Strided ones (ResNet's downsampling shortcuts) stay convolutions: as a slice and a product their input gradient
  (a scatter into every other pixel) was slower than lax's in the R50 step."""
  return dense(x, w[0, 0], None)


# nn.Conv with that weight gradient: the model's convolutions (parameters and outputs as nn.Conv's).
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)


def _conv_nhwc(x, w, strides, pads, precision):
  return jax.lax.conv_general_dilated(
    x, w, strides, pads, dimension_numbers=jax.lax.conv_dimension_numbers(x.shape, w.shape, _NHWC), precision=precision
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_matmul_wgrad(x, w, strides, pads, precision):
  return _conv_nhwc(x, w, strides, pads, precision)


def _conv_fwd(x, w, strides, pads, precision):
  return _conv_nhwc(x, w, strides, pads, precision), (x, w)


def _conv_bwd(strides, pads, precision, residuals, dy):
  x, w = residuals

  def by_products(x, w, dy):  # lax's input gradient, the weight gradient as products
    (dx,) = jax.vjp(lambda x_: _conv_nhwc(x_, w, strides, pads, precision), x)[1](dy)
    return dx, _weight_grad(x, dy, w.shape[:2], strides, pads, precision).astype(w.dtype)

  def by_lax(x, w, dy):  # both of lax's
    return jax.vjp(lambda x_, w_: _conv_nhwc(x_, w_, strides, pads, precision), x, w)[1](dy)

  return jax.lax.platform_dependent(x, w, dy, cpu=by_products, default=by_lax)


_conv_matmul_wgrad.defvjp(_conv_fwd, _conv_bwd)


def _tn_product(a, b, precision):
  """a (K, M), b (K, N) -> a^T b (M, N) float32. XLA:CPU's matrix product wants the contracted axis last in its
  left operand, so one operand is transposed (a copy): the narrower one (a^T b = (b^T a)^T)."""
  if a.shape[1] <= b.shape[1]:
    return jnp.matmul(a.T, b, precision=precision, preferred_element_type=jnp.float32)
  return jnp.matmul(b.T, a, precision=precision, preferred_element_type=jnp.float32).T


def _weight_grad(x, dy, kernel_hw, strides, pads, precision):
  """x (B, H, W, Ci), dy (B, Ho, Wo, Co) -> dW (kh, kw, Ci, Co) float32: one product per tap.

  Stride 1: dW[i, j] = X^T (Ci, B*H*W) @ dY shifted by the tap (the padded dY's window at (kh-1-i, kw-1-j)), so
  X is transposed once for all the products and only dY's windows are sliced. 1 x 1 or strided: the products of
  the (strided) windows of the padded X (`_tn_product`)."""
  kh, kw = kernel_hw
  (sh, sw), (b, ho, wo, co), ci = strides, dy.shape, x.shape[3]
  (pt, pb), (pl, pr) = pads
  taps = []
  if (sh, sw) == (1, 1) and (kh, kw) != (1, 1):
    xt = jnp.transpose(x, (3, 0, 1, 2)).reshape(ci, -1)  # (Ci, B*H*W)
    # dW[i, j] = sum over input pixels q of x[q] dy[q + pad - tap]: dY padded so that every window is in range.
    h, w = x.shape[1:3]
    dyp = jnp.pad(dy, ((0, 0), (kh - 1 - pt, h + pt - ho), (kw - 1 - pl, w + pl - wo), (0, 0)))
    for i in range(kh):
      for j in range(kw):
        window = jax.lax.slice(dyp, (0, kh - 1 - i, kw - 1 - j, 0), (b, kh - 1 - i + h, kw - 1 - j + w, co))
        taps.append(jnp.matmul(xt, window.reshape(-1, co), precision=precision, preferred_element_type=jnp.float32))
    return jnp.stack(taps).reshape(kh, kw, ci, co)
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  for i in range(kh):
    for j in range(kw):
      patch = jax.lax.slice(
        xp, (0, i, j, 0), (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, ci), (1, sh, sw, 1)
      )  # (B, Ho, Wo, Ci): the inputs tap (i, j) multiplies
      taps.append(_tn_product(patch.reshape(-1, ci), dy.reshape(-1, co), precision))
  return jnp.stack(taps).reshape(kh, kw, ci, co)


# ----------------------------------------------------------------------------------------------- max pooling
@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x, window, strides, padding):
  """nn.max_pool of NHWC x with window (kh, kw), strides (sh, sw) and explicit padding ((top, bottom), (left,
  right)): the same forward, with the gradient routed tap by tap (`_max_pool_bwd`).

  On XLA:CPU autodiff's gradient of the max (a windowed reduction carrying each window's argmax as four int32 index
  maps, then a scatter) made the R50 stem's pool at batch 2 (256 x 256 x 64 -> 128 x 128) take 162 ms forward and
  backward; tap by tap 47 ms, the same routing (`benchmarks/loss_ops.py`, BENCHMARKS.md session 19)."""
  return nn.max_pool(x, window, strides=strides, padding=padding)


def _max_pool_fwd(x, window, strides, padding):
  y = nn.max_pool(x, window, strides=strides, padding=padding)
  return y, (x, y)


def _max_pool_bwd(window, strides, padding, residuals, g):
  """Each window's gradient to its first maximum in row-major tap order (torch's max_pool2d and lax's choice on
  ties, such as the zeros after a ReLU): for tap (i, j) the window's input at that tap, a strided slice of the
  -inf-padded x (B, Ho, Wo, C), takes g where it equals the window's max and no earlier tap did; the taps' shares go
  back to their input pixels by a strided (interior) pad, and overlapping windows add."""
  x, y = residuals  # x (B, H, W, C), y (B, Ho, Wo, C)
  b, h, w, c = x.shape
  (pt, pb), (pl, pr) = padding
  (sh, sw), (ho, wo) = strides, y.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=-jnp.inf)  # (B, Hp, Wp, C)
  hp, wp = xp.shape[1:3]
  taken = jnp.zeros(y.shape, bool)  # (B, Ho, Wo, C): the window's maximum was found at an earlier tap
  dxp = jnp.zeros(xp.shape, g.dtype)
  zero = jnp.zeros((), g.dtype)
  for i in range(window[0]):
    for j in range(window[1]):
      last = (i + sh * (ho - 1), j + sw * (wo - 1))  # the tap's last input row / column in the padded map
      at_tap = jax.lax.slice(xp, (0, i, j, 0), (b, last[0] + 1, last[1] + 1, c), (1, sh, sw, 1))  # (B, Ho, Wo, C)
      first = (at_tap == y) & ~taken
      taken = taken | first
      share = jnp.where(first, g, zero)  # (B, Ho, Wo, C)
      dxp = dxp + jax.lax.pad(
        share, zero, ((0, 0, 0), (i, hp - 1 - last[0], sh - 1), (j, wp - 1 - last[1], sw - 1), (0, 0, 0))
      )  # (B, Hp, Wp, C)
  return (dxp[:, pt : pt + h, pl : pl + w],)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
