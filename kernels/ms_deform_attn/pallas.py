"""Pallas (Triton lowering) kernels for multi-scale deformable attention: forward and backward.

Same semantics as `reference.py` (torch `grid_sample`, bilinear, zero padding, align_corners=False; reference
section 7). Every kernel runs one program per (batch x head, block of BQ queries): it loads the block's locations
and weights over all K = L * P sample points, computes the four bilinear corners in registers and gathers the
corner rows of D channels from the (batch, head) value map.

* forward: accumulates the weighted corner rows in float32 -> (BQ, D);
* backward (`_bwd_kernel`): the dot product of each corner row with the output cotangent gives the gradients of
  the attention weights and of the locations (per-corner derivatives of the bilinear weights), accumulated in
  float32 -> (BQ, K) each. The value gradient is `attn * corner weight * cotangent` added into the corner rows:
  on a GPU in the same kernel with `pallas.triton.atomic_add` into a float32 buffer (the atomics resolve rows
  shared by several queries and points); off the GPU by the pure-JAX scatter-add of `xla.py`, because Pallas'
  interpret mode applies an atomic add as a plain scatter that keeps one of several updates to the same row
  (shared/reference/jax_stack.md, Pallas).

Triton constraints (shared/reference/jax_stack.md, Pallas): every in-kernel array has a power-of-2 size, so
queries are padded to a multiple of BQ, K and D to powers of two (padded points have weight 0, padded channels
are sliced off), and gather indices are clamped into the map (a GPU would read out of bounds otherwise).
`compiler_params=pallas.triton.CompilerParams` selects the Triton lowering rather than Mosaic GPU.

On CPU the kernels run with `interpret=True` (tests). They have not been run on a GPU yet: they are tested in
interpret mode (the atomic value gradient on inputs whose rows are distinct within each block, where interpret
mode is exact) and their Triton lowering is checked without a GPU (tests/kernels).
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
  """(1, Kp) array from python per-level constants, for points whose level index is `lvl` (padding: default)."""
  out = jnp.full(lvl.shape, default, jnp.int32)
  for i, v in enumerate(values):
    out = jnp.where(lvl == i, v, out)
  return out


def _block_corners(lx, ly, spatial_shapes, level_start_index, npoints, kp):
  """The four bilinear corners of a block's points. lx, ly (BQ, Kp) float32 normalized coordinates.

  Returns (hs, ws) (1, Kp) float32 level sizes and a list of 4 tuples (row (BQ, Kp) int32 clamped into the
  point's level; x weight; y weight; d(x weight)/dx; d(y weight)/dy), every weight (BQ, Kp) float32 and zero
  for a corner outside its map.
  """
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
  corners = []
  for dy in (0, 1):
    for dx in (0, 1):
      xi = x0 + dx
      yi = y0 + dy
      vx = ((xi >= 0) & (xi < ws)).astype(jnp.float32)
      vy = ((yi >= 0) & (yi < hs)).astype(jnp.float32)
      wx = (fx if dx else 1.0 - fx) * vx
      wy = (fy if dy else 1.0 - fy) * vy
      dwx = vx if dx else -vx
      dwy = vy if dy else -vy
      row = starts + jnp.clip(yi, 0, hs - 1) * ws + jnp.clip(xi, 0, ws - 1)  # always in bounds
      corners.append((row, wx, wy, dwx, dwy))
  return hs.astype(jnp.float32), ws.astype(jnp.float32), corners


def _load_block(refs, bh, qs):
  return [r[bh, qs, :].astype(jnp.float32) for r in refs]


def _fwd_kernel(v_ref, lx_ref, ly_ref, a_ref, o_ref, *, spatial_shapes, level_start_index, npoints, kp, dp):
  bh = pl.program_id(0)
  qs = pl.ds(pl.program_id(1) * BLOCK_Q, BLOCK_Q)
  lx, ly, a = _load_block((lx_ref, ly_ref, a_ref), bh, qs)  # (BQ, Kp) each
  _, _, corners = _block_corners(lx, ly, spatial_shapes, level_start_index, npoints, kp)
  chan = jax.lax.broadcasted_iota(jnp.int32, (1, 1, dp), 2)
  acc = jnp.zeros((BLOCK_Q, dp), jnp.float32)
  for row, wx, wy, _, _ in corners:
    g = v_ref[bh, row[:, :, None], chan].astype(jnp.float32)  # (BQ, Kp, Dp)
    acc = acc + jnp.sum(g * (wx * wy * a)[:, :, None], axis=1)
  o_ref[bh, qs, :] = acc.astype(o_ref.dtype)


def _bwd_kernel(
  v_ref, lx_ref, ly_ref, a_ref, go_ref, *refs, spatial_shapes, level_start_index, npoints, kp, dp, value_grad
):
  """Gradients of locations (pixel units times the level size) and weights; with value_grad, also the value's
  (refs = (zero float32 buffer aliased to the output, ..., its output ref))."""
  if value_grad:
    _, gx_ref, gy_ref, ga_ref, gv_ref = refs
  else:
    gx_ref, gy_ref, ga_ref = refs
  bh = pl.program_id(0)
  qs = pl.ds(pl.program_id(1) * BLOCK_Q, BLOCK_Q)
  lx, ly, a = _load_block((lx_ref, ly_ref, a_ref), bh, qs)  # (BQ, Kp) each
  go = go_ref[bh, qs, :].astype(jnp.float32)[:, None, :]  # (BQ, 1, Dp)
  hs, ws, corners = _block_corners(lx, ly, spatial_shapes, level_start_index, npoints, kp)
  chan = jax.lax.broadcasted_iota(jnp.int32, (1, 1, dp), 2)
  ga = jnp.zeros((BLOCK_Q, kp), jnp.float32)
  gx = jnp.zeros((BLOCK_Q, kp), jnp.float32)
  gy = jnp.zeros((BLOCK_Q, kp), jnp.float32)
  for row, wx, wy, dwx, dwy in corners:
    g = v_ref[bh, row[:, :, None], chan].astype(jnp.float32)  # (BQ, Kp, Dp)
    gv = jnp.sum(g * go, axis=2)  # (BQ, Kp): <corner row, cotangent>
    ga = ga + wx * wy * gv
    gx = gx + dwx * wy * gv
    gy = gy + wx * dwy * gv
    if value_grad:
      pltriton.atomic_add(gv_ref, (bh, row[:, :, None], chan), (a * wx * wy)[:, :, None] * go)
  ga_ref[bh, qs, :] = ga
  gx_ref[bh, qs, :] = gx * a * ws
  gy_ref[bh, qs, :] = gy * a * hs


def _layout(value, loc, attn):
  """Kernel layout: value (N*M, S, Dp); lx, ly, attn (N*M, Lqp, Kp); returns them and the padded sizes."""
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

  return v, per_head(loc[..., 0]), per_head(loc[..., 1]), per_head(attn), (kp, dp, lqp)


def _from_heads(x, n, m, lq, d):
  """(N*M, Lqp, Dp) -> (N, Lq, M, D)."""
  return x[:, :lq, :d].reshape(n, m, lq, d).transpose(0, 2, 1, 3)


def _call(kernel, grid, out_shape, interpret, name, **kwargs):
  return pl.pallas_call(
    kernel,
    out_shape=out_shape,
    grid=grid,
    compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
    interpret=interpret,
    name=name,
    **kwargs,
  )


def _forward(value, loc, attn, spatial_shapes, level_start_index, interpret):
  """Returns (N, Lq, M, D) in value's dtype."""
  n, _, m, d = value.shape
  lq, npt = loc.shape[1], loc.shape[4]
  v, lx, ly, a, (kp, dp, lqp) = _layout(value, loc, attn)
  kernel = functools.partial(
    _fwd_kernel, spatial_shapes=spatial_shapes, level_start_index=level_start_index, npoints=npt, kp=kp, dp=dp
  )
  out_shape = jax.ShapeDtypeStruct((n * m, lqp, dp), value.dtype)
  out = _call(kernel, (n * m, lqp // BLOCK_Q), out_shape, interpret, 'ms_deform_attn_fwd')(v, lx, ly, a)
  return _from_heads(out, n, m, lq, d)


def _backward(value, loc, attn, spatial_shapes, level_start_index, gout, interpret, value_grad):
  """gout (N, Lq, M, D). Returns float32 (grad_value, grad_loc, grad_attn); grad_value is computed by the
  kernel's atomic adds when value_grad, else by the pure-JAX scatter-add of xla.py."""
  n, s, m, d = value.shape
  _, lq, _, nl, npt, _ = loc.shape
  gout = gout.astype(jnp.float32)
  v, lx, ly, a, (kp, dp, lqp) = _layout(value, loc, attn)
  go = jnp.pad(gout.transpose(0, 2, 1, 3).reshape(n * m, lq, d), ((0, 0), (0, lqp - lq), (0, dp - d)))
  kernel = functools.partial(
    _bwd_kernel,
    spatial_shapes=spatial_shapes,
    level_start_index=level_start_index,
    npoints=npt,
    kp=kp,
    dp=dp,
    value_grad=value_grad,
  )
  small = jax.ShapeDtypeStruct((n * m, lqp, kp), jnp.float32)
  out_shape = [small, small, small]
  args = [v, lx, ly, a, go]
  extra = {}
  if value_grad:
    out_shape.append(jax.ShapeDtypeStruct((n * m, s, dp), jnp.float32))
    args.append(jnp.zeros((n * m, s, dp), jnp.float32))
    extra['input_output_aliases'] = {5: 3}
  outs = _call(kernel, (n * m, lqp // BLOCK_Q), out_shape, interpret, 'ms_deform_attn_bwd', **extra)(*args)

  def to_points(x):  # (N*M, Lqp, Kp) -> (N, Lq, M, L, P)
    return x[:, :lq, : nl * npt].reshape(n, m, lq, nl, npt).transpose(0, 2, 1, 3, 4)

  grad_loc = jnp.stack([to_points(outs[0]), to_points(outs[1])], axis=-1)
  grad_attn = to_points(outs[2])
  if value_grad:
    grad_value = outs[3][:, :, :d].reshape(n, m, s, d).transpose(0, 2, 1, 3)
  else:
    grad_value = xla.value_grad(value.shape, loc, attn, gout, spatial_shapes, level_start_index)
  return grad_value, grad_loc, grad_attn


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _msda(value, loc, attn, spatial_shapes, level_start_index, interpret, value_grad):
  return _forward(value, loc, attn, spatial_shapes, level_start_index, interpret)


def _msda_fwd(value, loc, attn, spatial_shapes, level_start_index, interpret, value_grad):
  return _forward(value, loc, attn, spatial_shapes, level_start_index, interpret), (value, loc, attn)


def _msda_bwd(spatial_shapes, level_start_index, interpret, value_grad, res, gout):
  value, loc, attn = res
  gv, gl, ga = _backward(value, loc, attn, spatial_shapes, level_start_index, gout, interpret, value_grad)
  return gv.astype(value.dtype), gl.astype(loc.dtype), ga.astype(attn.dtype)


_msda.defvjp(_msda_fwd, _msda_bwd)


def ms_deform_attn_pallas(
  value, spatial_shapes, level_start_index, sampling_locations, attention_weights, interpret, atomic_value_grad=None
):
  """Pallas op. value (N, S, M, D); locations (N, Lq, M, L, P, 2); weights (N, Lq, M, L, P) -> (N, Lq, M * D).

  `spatial_shapes` and `level_start_index` are tuples of python ints; `interpret` runs the kernels as XLA ops.
  `atomic_value_grad` (default: not interpret) takes the value gradient from the backward kernel's atomic adds;
  off, from the pure-JAX scatter-add. Interpret mode with atomics is exact only when the corner rows within each
  block of queries are distinct (tests).
  """
  value = jnp.asarray(value)
  atomic = (not interpret) if atomic_value_grad is None else bool(atomic_value_grad)
  out = _msda(
    value,
    jnp.asarray(sampling_locations),
    jnp.asarray(attention_weights),
    spatial_shapes,
    level_start_index,
    bool(interpret),
    atomic,
  )
  n, lq, m, d = out.shape
  return out.reshape(n, lq, m * d)
