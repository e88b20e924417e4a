"""Straightforward pure-JAX multi-scale deformable attention (the oracle for the faster paths).

Implements `ms_deform_attn_core_pytorch` of Deformable DETR (docs/architecture.md, "Deformable attention"): for each
level, bilinear sampling with zero padding exactly as torch `grid_sample(mode='bilinear', padding_mode='zeros',
align_corners=False)`, weighted by the attention weights and summed over levels and points. Written for
clarity, not speed: one bilinear sampler per (batch, head) map, vmapped; gradients come from autodiff.
"""

import jax
import jax.numpy as jnp


def _bilinear_zeros(img, x, y):
  """Samples `img` (H, W, D) at pixel coordinates `x`, `y` (K,), zero outside. Returns (K, D) float32.

  Pixel (i, j) has its center at x = j, y = i; a corner outside [0, W-1] x [0, H-1] contributes 0.
  """
  h, w, _ = img.shape
  x0 = jnp.floor(x)
  y0 = jnp.floor(y)
  fx = x - x0
  fy = y - y0
  x0 = x0.astype(jnp.int32)
  y0 = y0.astype(jnp.int32)
  out = 0.0
  for dy, dx, wgt in (
    (0, 0, (1 - fx) * (1 - fy)),
    (0, 1, fx * (1 - fy)),
    (1, 0, (1 - fx) * fy),
    (1, 1, fx * fy),
  ):
    xi = x0 + dx
    yi = y0 + dy
    valid = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
    pix = img[jnp.clip(yi, 0, h - 1), jnp.clip(xi, 0, w - 1)].astype(jnp.float32)  # (K, D)
    out = out + jnp.where(valid, wgt, 0.0)[:, None] * pix
  return out


def ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
  """Reference op. value (N, S, M, D); locations (N, Lq, M, L, P, 2) in [0, 1] (x, y); weights (N, Lq, M, L, P).

  `spatial_shapes` and `level_start_index` are tuples of python ints. Returns (N, Lq, M * D) in value's dtype.
  """
  n, _, m, d = value.shape
  _, lq, _, nl, npt, _ = sampling_locations.shape
  loc = sampling_locations.astype(jnp.float32)
  attn = attention_weights.astype(jnp.float32)
  # Sample one (batch, head) map at K points.
  sample = jax.vmap(jax.vmap(_bilinear_zeros, in_axes=(2, 0, 0)), in_axes=(0, 0, 0))
  out = jnp.zeros((n, lq, m, d), jnp.float32)
  for lvl, (h, w) in enumerate(spatial_shapes):
    start = level_start_index[lvl]
    v = value[:, start : start + h * w].reshape(n, h, w, m, d)  # (N, H, W, M, D)
    x = loc[:, :, :, lvl, :, 0] * w - 0.5  # (N, Lq, M, P) pixel coordinates
    y = loc[:, :, :, lvl, :, 1] * h - 0.5
    x = x.transpose(0, 2, 1, 3).reshape(n, m, lq * npt)  # (N, M, Lq*P)
    y = y.transpose(0, 2, 1, 3).reshape(n, m, lq * npt)
    s = sample(v, x, y)  # (N, M, Lq*P, D)
    s = s.reshape(n, m, lq, npt, d).transpose(0, 2, 1, 3, 4)  # (N, Lq, M, P, D)
    out = out + jnp.sum(s * attn[:, :, :, lvl, :, None], axis=3)
  return out.reshape(n, lq, m * d).astype(value.dtype)
