"""Multi-scale deformable attention as dense matrix products, for small feature maps (no gather, no scatter).

Same semantics as `reference.py` (torch `grid_sample`, bilinear, zero padding, align_corners=False;
docs/architecture.md, "Deformable attention").
Bilinear sampling is separable: the weight of pixel (h, w) for a sample at pixel coordinates (x, y)
is ky(h) * kx(w), where kx(w) = 1 - fx at w = floor(x), fx at w = floor(x) + 1 and 0 elsewhere (fx = x -
floor(x)); pixels outside the map simply do not exist in the one-hot range, which is exactly zero padding. So
for each level

  A[n, q, m, h, w] = sum_p attn[n, q, m, p] * ky_p(h) * kx_p(w)      (N, Lq, M, H, W)  dense sampling matrix
  out[n, q, m, :]  += sum_{h, w} A[n, q, m, h, w] * value[n, h, w, m, :]

two einsums that XLA turns into batched matrix products, and whose autodiff is again matrix products: the
backward has no scatter-add. The gradient with respect to a location is the bilinear one (floor treated as
constant), as in `xla.py` and torch.

Cost grows with Lq * M * S (the dense matrix), so this only pays off when the maps are small: the CPU demo
(128 px canvas, S = 340 tokens) and decoder-side calls on small images. `dense_fits` is the size rule that the
dispatcher's 'auto' uses.
"""

import jax.numpy as jnp

# Largest dense sampling matrix (elements of N * Lq * M * S) for which 'auto' picks this formulation. At the
# shapes-config sizes (8 x 340 x 4 x 340 = 3.7 M) it beats the gather formulation several times over; at the
# COCO encoder size (21,760 queries x 21,760 tokens x 8 heads) it would need ~15 GB and is never chosen.
DENSE_MAX_ELEMENTS = 1 << 25


def dense_fits(n, lq, m, s):
  return n * lq * m * s <= DENSE_MAX_ELEMENTS


def _one_hot_taps(coord, size):
  """coord (...,) float32 pixel coordinate -> (..., size) bilinear tap weights (zero outside [0, size))."""
  c0 = jnp.floor(coord)
  frac = coord - c0  # the gradient flows through frac only: d/dcoord = -1 at c0, +1 at c0 + 1
  i0 = c0.astype(jnp.int32)[..., None]
  grid = jnp.arange(size, dtype=jnp.int32)
  return jnp.where(grid == i0, 1.0 - frac[..., None], 0.0) + jnp.where(grid == i0 + 1, frac[..., None], 0.0)


def ms_deform_attn_dense(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
  """value (N, S, M, D); locations (N, Lq, M, L, P, 2); weights (N, Lq, M, L, P) -> (N, Lq, M * D).

  `spatial_shapes` and `level_start_index` are tuples of python ints. Accumulates in float32 and returns
  value's dtype.
  """
  value = jnp.asarray(value)
  n, _, m, d = value.shape
  lq = sampling_locations.shape[1]
  loc = jnp.asarray(sampling_locations, jnp.float32)
  attn = jnp.asarray(attention_weights, jnp.float32)
  loc = jnp.transpose(loc, (0, 2, 1, 3, 4, 5))  # (N, M, Lq, L, P, 2): batch and head lead the matrix products
  attn = jnp.transpose(attn, (0, 2, 1, 3, 4))  # (N, M, Lq, L, P)
  out = jnp.zeros((n, m, lq, d), jnp.float32)
  for lvl, ((h, w), start) in enumerate(zip(spatial_shapes, level_start_index)):
    v = value[:, start : start + h * w].astype(jnp.float32)  # (N, H * W, M, D)
    v = jnp.transpose(v, (0, 2, 1, 3))  # (N, M, H * W, D)
    kx = _one_hot_taps(loc[:, :, :, lvl, :, 0] * w - 0.5, w)  # (N, M, Lq, P, W)
    ky = _one_hot_taps(loc[:, :, :, lvl, :, 1] * h - 0.5, h) * attn[:, :, :, lvl, :, None]  # (N, M, Lq, P, H)
    # Dense sampling matrix (N, M, Lq, H * W): an elementwise product summed over the P points (one fused loop).
    a = jnp.sum(ky[..., :, None] * kx[..., None, :], axis=3).reshape(n, m, lq, h * w)
    out = out + jnp.einsum('nmqs,nmsd->nmqd', a, v)  # batched (Lq x HW) @ (HW x D) matrix products
  out = jnp.transpose(out, (0, 2, 1, 3))  # (N, Lq, M, D)
  return out.reshape(n, lq, m * d).astype(value.dtype)
