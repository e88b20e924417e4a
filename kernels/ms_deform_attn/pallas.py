"""Pallas (Triton lowering) forward kernel for multi-scale deformable attention; backward in pure JAX.

Same semantics as `reference.py` (torch `grid_sample`, bilinear, zero padding, align_corners=False; reference
section 7). One program per (batch x head, block of BQ queries): it loads the block's locations and weights
over all K = L * P sample points, computes the four bilinear corners in registers, gathers the corner rows of
D channels from the (batch, head) value map, and accumulates the weighted rows in float32.

Triton constraints (shared/reference/jax_stack.md, Pallas): every in-kernel array has a power-of-2 size, so
queries are padded to a multiple of BQ, K and D to powers of two (padded points have weight 0, padded channels
are sliced off), and gather indices are clamped into the map (a GPU would read out of bounds otherwise).
`compiler_params=pallas.triton.CompilerParams` selects the Triton lowering rather than Mosaic GPU.

On CPU the kernel runs with `interpret=True` (tests). The backward is the pure-JAX backward of `xla.py`
(gradients for locations and weights from per-corner dot products, for value one scatter-add); an atomic-add
GPU backward kernel is not written yet. This kernel has not been run on a GPU yet: it is tested in interpret
mode and its Triton lowering is checked without a GPU (tests/kernels).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels.ms_deform_attn import xla

BLOCK_Q = 16


def _next_pow2(x):
  return 1 << max(0, (int(x) - 1).bit_length())


def _per_point(values, lvl, default):
  """(Kp,) array from python per-level constants, for points whose level index is `lvl` (padding: default)."""
  out = jnp.full(lvl.shape, default, jnp.int32)
  for i, v in enumerate(values):
    out = jnp.where(lvl == i, v, out)
  return out


def _kernel(v_ref, lx_ref, ly_ref, a_ref, o_ref, *, spatial_shapes, level_start_index, npoints, kp, dp):
  bh = pl.program_id(0)
  qb = pl.program_id(1)
  qs = pl.ds(qb * BLOCK_Q, BLOCK_Q)
  lx = lx_ref[bh, qs, :].astype(jnp.float32)  # (BQ, Kp)
  ly = ly_ref[bh, qs, :].astype(jnp.float32)
  a = a_ref[bh, qs, :].astype(jnp.float32)
  lvl = jax.lax.broadcasted_iota(jnp.int32, (1, kp), 1) // npoints  # (1, Kp) level of each point
  hs = _per_point([h for h, _ in spatial_shapes], lvl, 1)
  ws = _per_point([w for _, w in spatial_shapes], lvl, 1)
  starts = _per_point(list(level_start_index), lvl, 0)
  x = lx * ws.astype(jnp.float32) - 0.5
  y = ly * hs.astype(jnp.float32) - 0.5
  x0f = jnp.floor(x)
  y0f = jnp.floor(y)
  fx = x - x0f
  fy = y - y0f
  x0 = x0f.astype(jnp.int32)
  y0 = y0f.astype(jnp.int32)
  chan = jax.lax.broadcasted_iota(jnp.int32, (1, 1, dp), 2)
  acc = jnp.zeros((BLOCK_Q, dp), jnp.float32)
  for dy in (0, 1):
    for dx in (0, 1):
      xi = x0 + dx
      yi = y0 + dy
      valid = (xi >= 0) & (xi < ws) & (yi >= 0) & (yi < hs)
      wgt = (fx if dx else 1.0 - fx) * (fy if dy else 1.0 - fy) * a
      wgt = jnp.where(valid, wgt, 0.0)
      row = starts + jnp.clip(yi, 0, hs - 1) * ws + jnp.clip(xi, 0, ws - 1)  # (BQ, Kp), always in bounds
      g = v_ref[bh, row[:, :, None], chan].astype(jnp.float32)  # (BQ, Kp, Dp)
      acc = acc + jnp.sum(g * wgt[:, :, None], axis=1)
  o_ref[bh, qs, :] = acc.astype(o_ref.dtype)


def _forward(value, loc, attn, spatial_shapes, level_start_index, interpret):
  """Returns (N, Lq, M, D) in value's dtype."""
  n, s, m, d = value.shape
  _, lq, _, nl, npt, _ = loc.shape
  k = nl * npt
  kp = _next_pow2(k)
  dp = _next_pow2(d)
  lqp = -(-lq // BLOCK_Q) * BLOCK_Q
  v = value.transpose(0, 2, 1, 3).reshape(n * m, s, d)  # (N*M, S, D): one map per (batch, head)
  v = jnp.pad(v, ((0, 0), (0, 0), (0, dp - d)))

  def per_head(x):  # (N, Lq, M, L, P) -> (N*M, Lqp, Kp), padded points get 0
    x = x.transpose(0, 2, 1, 3, 4).reshape(n * m, lq, k)
    return jnp.pad(x, ((0, 0), (0, lqp - lq), (0, kp - k)))

  lx = per_head(loc[..., 0])
  ly = per_head(loc[..., 1])
  a = per_head(attn)
  kernel = functools.partial(
    _kernel,
    spatial_shapes=spatial_shapes,
    level_start_index=level_start_index,
    npoints=npt,
    kp=kp,
    dp=dp,
  )
  out = pl.pallas_call(
    kernel,
    out_shape=jax.ShapeDtypeStruct((n * m, lqp, dp), value.dtype),
    grid=(n * m, lqp // BLOCK_Q),
    compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
    interpret=interpret,
    name='ms_deform_attn_fwd',
  )(v, lx, ly, a)
  return out[:, :lq, :d].reshape(n, m, lq, d).transpose(0, 2, 1, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _msda(value, loc, attn, spatial_shapes, level_start_index, interpret):
  return _forward(value, loc, attn, spatial_shapes, level_start_index, interpret)


def _msda_fwd(value, loc, attn, spatial_shapes, level_start_index, interpret):
  return _forward(value, loc, attn, spatial_shapes, level_start_index, interpret), (value, loc, attn)


def _msda_bwd(spatial_shapes, level_start_index, interpret, res, gout):
  del interpret
  value, loc, attn = res
  gv, gl, ga = xla._backward(value, loc, attn, spatial_shapes, level_start_index, gout.astype(jnp.float32))
  return gv.astype(value.dtype), gl.astype(loc.dtype), ga.astype(attn.dtype)


_msda.defvjp(_msda_fwd, _msda_bwd)


def ms_deform_attn_pallas(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, interpret):
  """Pallas op. value (N, S, M, D); locations (N, Lq, M, L, P, 2); weights (N, Lq, M, L, P) -> (N, Lq, M * D).

  `spatial_shapes` and `level_start_index` are tuples of python ints; `interpret` runs the kernel as XLA ops.
  """
  value = jnp.asarray(value)
  out = _msda(
    value,
    jnp.asarray(sampling_locations),
    jnp.asarray(attention_weights),
    spatial_shapes,
    level_start_index,
    bool(interpret),
  )
  n, lq, m, d = out.shape
  return out.reshape(n, lq, m * d)
