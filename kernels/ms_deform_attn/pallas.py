"""Pallas (Triton lowering) kernels for multi-scale deformable attention: forward and backward.

Same semantics as `reference.py` (torch `grid_sample`, bilinear, zero padding, align_corners=False;
docs/architecture.md, "Deformable attention").
Every kernel runs one program per (batch x head, block of BQ queries) and walks the K = L * P sample
points one at a time (a python loop over the levels, whose sizes are kernel constants, and a `fori_loop` over the
points of each): per point it loads the block's (BQ,) locations and weights, computes the four bilinear corners
and gathers the corner rows of D channels, a (BQ, D) tile each, from the (batch, head) value map. Only those
tiles and the accumulator are live, which keeps the kernels at 32-40 registers per thread with no spills (PTX
assembled for sm_90a by `cuda_compile.py`; the first version, which gathered all K points of a block at once,
needed 180 registers forward and 255 with spills backward).

* forward: accumulates the weighted corner rows in float32 -> (BQ, D);
* backward (`_bwd_kernel`): the dot product of each corner row with the output cotangent gives the gradients of
  the attention weight and of the location of the point (per-corner derivatives of the bilinear weights), in
  float32, stored per point. The value gradient is `attn * corner weight * cotangent` added into the corner
  rows: on a GPU in the same kernel with `pallas.triton.atomic_add` into a float32 buffer (the atomics resolve
  rows shared by several queries and points); off the GPU by the pure-JAX scatter-add of `xla.py`, because
  Pallas' interpret mode applies an atomic add as a plain scatter that keeps one of several updates to the same
  row (docs/jax_notes.md, Pallas).

Layout: value (N*M, S, Dp) (one map per batch x head), locations and weights point-major (N*M, K, Lqp) so a
point's BQ values are contiguous. Triton constraints (docs/jax_notes.md, Pallas): every in-kernel
array has a power-of-2 size, so queries are padded to a multiple of BQ and D to a power of two (padded
channels are sliced off; K needs no padding since points are indexed one at a time), and gather indices are
clamped into the map (a GPU would read out of bounds otherwise). `compiler_params=pallas.triton.CompilerParams`
selects the Triton lowering rather than Mosaic GPU.

On CPU the kernels run with `interpret=True` (tests). They have not been run on a GPU: they are tested in
interpret mode (the atomic value gradient on inputs whose rows are distinct within each block, where interpret
mode is exact), and compiled without a GPU through Triton to PTX and by ptxas to sm_80 / sm_90a machine code
(`cuda_compile.py`, tests/kernels/test_cuda_compile.py).
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


def _corners(lx, ly, h, w, start):
  """The four bilinear corners of BQ points on one level (python ints h, w, start). lx, ly (BQ,) float32.

  Returns 4 tuples (row (BQ,) int32 clamped into the level; x weight; y weight; d(x weight)/dx; d(y weight)/dy),
  each weight (BQ,) float32 and zero for a corner outside the map.
  """
  x = lx * float(w) - 0.5
  y = ly * float(h) - 0.5
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
      vx = ((xi >= 0) & (xi < w)).astype(jnp.float32)
      vy = ((yi >= 0) & (yi < h)).astype(jnp.float32)
      wx = (fx if dx else 1.0 - fx) * vx
      wy = (fy if dy else 1.0 - fy) * vy
      dwx = vx if dx else -vx
      dwy = vy if dy else -vy
      row = start + jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)  # always in bounds
      corners.append((row, wx, wy, dwx, dwy))
  return corners


def _for_each_point(spatial_shapes, level_start_index, npoints, body, carry):
  """carry = body(k, (h, w, start), carry) for every sample point k = level * npoints + p: a python loop over the
  levels (their sizes are constants in the kernel) and a `fori_loop` over the points of each."""
  for lvl, ((h, w), start) in enumerate(zip(spatial_shapes, level_start_index)):
    carry = jax.lax.fori_loop(0, npoints, lambda p, c, lvl=lvl, hw=(h, w, start): body(lvl * npoints + p, hw, c), carry)
  return carry


def _load_point(refs, bh, k, qs):
  return [r[bh, k, qs].astype(jnp.float32) for r in refs]  # (BQ,) each


def _fwd_kernel(v_ref, lx_ref, ly_ref, a_ref, o_ref, *, spatial_shapes, level_start_index, npoints, dp):
  bh = pl.program_id(0)
  qs = pl.ds(pl.program_id(1) * BLOCK_Q, BLOCK_Q)
  chan = jax.lax.broadcasted_iota(jnp.int32, (1, dp), 1)

  def point(k, level, acc):  # acc (BQ, Dp) float32
    lx, ly, a = _load_point((lx_ref, ly_ref, a_ref), bh, k, qs)
    for row, wx, wy, _, _ in _corners(lx, ly, *level):
      g = v_ref[bh, row[:, None], chan].astype(jnp.float32)  # (BQ, Dp): the corner rows
      acc = acc + g * (wx * wy * a)[:, None]
    return acc

  acc = _for_each_point(spatial_shapes, level_start_index, npoints, point, jnp.zeros((BLOCK_Q, dp), jnp.float32))
  o_ref[bh, qs, :] = acc.astype(o_ref.dtype)


def _bwd_kernel(
  v_ref, lx_ref, ly_ref, a_ref, go_ref, *refs, spatial_shapes, level_start_index, npoints, dp, value_grad
):
  """Gradients of locations (pixel units times the level size) and weights; with value_grad, also the value's
  (refs = (zero float32 buffer aliased to the output, ..., its output ref))."""
  if value_grad:
    _, gx_ref, gy_ref, ga_ref, gv_ref = refs
  else:
    gx_ref, gy_ref, ga_ref = refs
  bh = pl.program_id(0)
  qs = pl.ds(pl.program_id(1) * BLOCK_Q, BLOCK_Q)
  go = go_ref[bh, qs, :].astype(jnp.float32)  # (BQ, Dp)
  chan = jax.lax.broadcasted_iota(jnp.int32, (1, dp), 1)

  def point(k, level, carry):
    lx, ly, a = _load_point((lx_ref, ly_ref, a_ref), bh, k, qs)
    zero = jnp.zeros((BLOCK_Q,), jnp.float32)
    ga, gx, gy = zero, zero, zero
    for row, wx, wy, dwx, dwy in _corners(lx, ly, *level):
      g = v_ref[bh, row[:, None], chan].astype(jnp.float32)  # (BQ, Dp)
      gv = jnp.sum(g * go, axis=1)  # (BQ,): <corner row, cotangent>
      ga = ga + wx * wy * gv
      gx = gx + dwx * wy * gv
      gy = gy + wx * dwy * gv
      if value_grad:
        pltriton.atomic_add(gv_ref, (bh, row[:, None], chan), (a * wx * wy)[:, None] * go)
    ga_ref[bh, k, qs] = ga
    gx_ref[bh, k, qs] = gx * a * float(level[1])
    gy_ref[bh, k, qs] = gy * a * float(level[0])
    return carry

  _for_each_point(spatial_shapes, level_start_index, npoints, point, jnp.int32(0))


def _layout(value, loc, attn):
  """Kernel layout: value (N*M, S, Dp); lx, ly, attn (N*M, K, Lqp) point-major; returns them and the padded
  sizes."""
  n, s, m, d = value.shape
  _, lq, _, nl, npt, _ = loc.shape
  k = nl * npt
  dp = _next_pow2(d)
  lqp = -(-lq // BLOCK_Q) * BLOCK_Q
  v = value.transpose(0, 2, 1, 3).reshape(n * m, s, d)  # (N*M, S, D): one map per (batch, head)
  v = jnp.pad(v, ((0, 0), (0, 0), (0, dp - d)))

  def per_head(x):  # (N, Lq, M, L, P) -> (N*M, K, Lqp), padded queries get 0
    x = x.transpose(0, 2, 3, 4, 1).reshape(n * m, k, lq)
    return jnp.pad(x, ((0, 0), (0, 0), (0, lqp - lq)))

  return v, per_head(loc[..., 0]), per_head(loc[..., 1]), per_head(attn), (dp, lqp)


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
  v, lx, ly, a, (dp, lqp) = _layout(value, loc, attn)
  kernel = functools.partial(
    _fwd_kernel, spatial_shapes=spatial_shapes, level_start_index=level_start_index, npoints=npt, dp=dp
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
  v, lx, ly, a, (dp, lqp) = _layout(value, loc, attn)
  go = jnp.pad(gout.transpose(0, 2, 1, 3).reshape(n * m, lq, d), ((0, 0), (0, lqp - lq), (0, dp - d)))
  kernel = functools.partial(
    _bwd_kernel,
    spatial_shapes=spatial_shapes,
    level_start_index=level_start_index,
    npoints=npt,
    dp=dp,
    value_grad=value_grad,
  )
  small = jax.ShapeDtypeStruct((n * m, nl * npt, lqp), jnp.float32)
  out_shape = [small, small, small]
  args = [v, lx, ly, a, go]
  extra = {}
  if value_grad:
    out_shape.append(jax.ShapeDtypeStruct((n * m, s, dp), jnp.float32))
    args.append(jnp.zeros((n * m, s, dp), jnp.float32))
    extra['input_output_aliases'] = {5: 3}
  outs = _call(kernel, (n * m, lqp // BLOCK_Q), out_shape, interpret, 'ms_deform_attn_bwd', **extra)(*args)

  def to_points(x):  # (N*M, K, Lqp) -> (N, Lq, M, L, P)
    return x[:, :, :lq].reshape(n, m, nl, npt, lq).transpose(0, 4, 1, 2, 3)

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
