"""Fast pure-JAX multi-scale deformable attention with a hand-written backward (`jax.custom_vjp`).

Same semantics as `reference.py` (torch `grid_sample`, bilinear, zero padding, align_corners=False; reference
section 7). Formulation, chosen by measurement on XLA:CPU (benchmarks/msda.py, shared/reference/jax_stack.md):

* value is viewed as rows of D channels, `(N * S * M, D)`, so one sample corner is one contiguous row; the row
  of pixel (h, w) of level l, head m, batch n is `(n * S + start_l + h * W_l + w) * M + m`;
* the index math is vectorized over levels (per-level H, W and start offsets are small constant arrays
  broadcast along the L axis), giving one index array and one weight array per bilinear corner (four gathers
  in all, no `jnp.stack` in the index math); the four weighted gathers are reduced over (L, P) and summed in
  one expression into a 4-D `(N, Lq, M, D)` result, turned into `(N, Lq, M * D)` last by concatenating the
  heads (a plain reshape gets folded into the gather loop by XLA:CPU and costs ~3x). Compared with one gather
  per (level, corner), this compiles 3-7x faster and runs at least as fast;
* the backward recomputes indices and weights, gets the location and attention gradients from per-corner dot
  products <value row, output cotangent>, and the value gradient from a single scatter-add whose updates are
  `weight * cotangent` for all corners at once.

Accumulation is float32 whatever the input dtype; outputs and gradients come back in the inputs' dtypes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _level_consts(spatial_shapes, level_start_index, m):
  """Per-level constants shaped (L, 1) to broadcast against (N, Lq, M, L, P)."""
  hs = np.array([h for h, _ in spatial_shapes], np.int32)[:, None]
  ws = np.array([w for _, w in spatial_shapes], np.int32)[:, None]
  starts = np.array(level_start_index, np.int32)[:, None] * m
  return hs, ws, starts


def _corners(loc, spatial_shapes, level_start_index, m):
  """Bilinear corners for all levels at once. loc (N, Lq, M, L, P, 2) float32, normalized (x, y).

  Returns a list of 4 tuples (row offset within a (batch, head) (N, Lq, M, L, P) int32, clamped into its level;
  x weight; y weight; d(x weight)/d(fx); d(y weight)/d(fy)), weights already zero for a corner outside the map.
  The row offset still has to be added to the (batch, head) base and is premultiplied by M.
  """
  hs, ws, starts = _level_consts(spatial_shapes, level_start_index, m)
  x = loc[..., 0] * ws.astype(np.float32) - 0.5  # pixel coordinates, torch grid_sample align_corners=False
  y = loc[..., 1] * hs.astype(np.float32) - 0.5
  x0f = jnp.floor(x)
  y0f = jnp.floor(y)
  fx = x - x0f
  fy = y - y0f
  x0 = x0f.astype(jnp.int32)
  y0 = y0f.astype(jnp.int32)
  vx0 = ((x0 >= 0) & (x0 <= ws - 1)).astype(jnp.float32)
  vx1 = ((x0 >= -1) & (x0 <= ws - 2)).astype(jnp.float32)
  vy0 = ((y0 >= 0) & (y0 <= hs - 1)).astype(jnp.float32)
  vy1 = ((y0 >= -1) & (y0 <= hs - 2)).astype(jnp.float32)
  xs = (jnp.clip(x0, 0, ws - 1), jnp.clip(x0 + 1, 0, ws - 1))
  ys = (jnp.clip(y0, 0, hs - 1), jnp.clip(y0 + 1, 0, hs - 1))
  wx = ((1.0 - fx) * vx0, fx * vx1)
  wy = ((1.0 - fy) * vy0, fy * vy1)
  dwx = (-vx0, vx1)
  dwy = (-vy0, vy1)
  corners = []
  for j in (0, 1):
    for i in (0, 1):
      corners.append((starts + (ys[j] * ws + xs[i]) * m, wx[i], wy[j], dwx[i], dwy[j]))
  return corners


def _row_base(n, s, m):
  """Row of (batch n, head m, token 0) in the (N * S * M, D) view, shaped (N, 1, M, 1, 1) int32."""
  if n * s * m >= 2**31:
    raise ValueError(f'ms_deform_attn: N * S * M = {n * s * m} rows overflow int32 indices; split the batch.')
  nb = np.arange(n, dtype=np.int32)[:, None, None, None, None] * (s * m)
  mb = np.arange(m, dtype=np.int32)[None, None, :, None, None]
  return nb + mb


def _forward(value, loc, attn, spatial_shapes, level_start_index):
  """Returns (N, Lq, M, D) float32."""
  n, s, m, d = value.shape
  rows = value.reshape(n * s * m, d)
  base = _row_base(n, s, m)
  loc = loc.astype(jnp.float32)
  attn = attn.astype(jnp.float32)
  out = None
  for off, wx, wy, _, _ in _corners(loc, spatial_shapes, level_start_index, m):
    g = rows.at[base + off].get(mode='promise_in_bounds').astype(jnp.float32)  # (N, Lq, M, L, P, D)
    term = jnp.sum(g * (attn * wx * wy)[..., None], axis=(3, 4))  # (N, Lq, M, D)
    out = term if out is None else out + term
  return out


def _backward(value, loc, attn, spatial_shapes, level_start_index, gout):
  """gout (N, Lq, M, D) float32. Returns (grad_value, grad_loc, grad_attn) in float32."""
  n, s, m, d = value.shape
  lq = loc.shape[1]
  rows = value.reshape(n * s * m, d)
  base = _row_base(n, s, m)
  loc = loc.astype(jnp.float32)
  attn = attn.astype(jnp.float32)
  hs, ws, _ = _level_consts(spatial_shapes, level_start_index, m)
  g6 = gout[:, :, :, None, None, :]  # (N, Lq, M, 1, 1, D)
  ga = gx = gy = 0.0
  idxs = []
  coefs = []
  for off, wx, wy, dwx, dwy in _corners(loc, spatial_shapes, level_start_index, m):
    idx = base + off  # (N, Lq, M, L, P)
    v = rows.at[idx].get(mode='promise_in_bounds').astype(jnp.float32)  # (N, Lq, M, L, P, D)
    gv = jnp.sum(v * g6, axis=-1)  # (N, Lq, M, L, P): <value row, cotangent>
    wc = wx * wy
    ga = ga + wc * gv
    gx = gx + dwx * wy * gv
    gy = gy + wx * dwy * gv
    idxs.append(idx.reshape(n, lq, m, 1, -1))
    coefs.append((attn * wc).reshape(n, lq, m, 1, -1))
  idx = jnp.concatenate(idxs, axis=3)  # (N, Lq, M, 4, L * P)
  upd = jnp.concatenate(coefs, axis=3)[..., None] * gout[:, :, :, None, None, :]  # (N, Lq, M, 4, L * P, D)
  grad_rows = jnp.zeros((n * s * m, d), jnp.float32).at[idx].add(upd, mode='promise_in_bounds')
  grad_value = grad_rows.reshape(n, s, m, d)
  grad_loc = jnp.stack([gx * attn * ws.astype(np.float32), gy * attn * hs.astype(np.float32)], axis=-1)
  return grad_value, grad_loc, ga


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _msda(value, loc, attn, spatial_shapes, level_start_index):
  return _forward(value, loc, attn, spatial_shapes, level_start_index).astype(value.dtype)


def _msda_fwd(value, loc, attn, spatial_shapes, level_start_index):
  out = _forward(value, loc, attn, spatial_shapes, level_start_index).astype(value.dtype)
  return out, (value, loc, attn)


def _msda_bwd(spatial_shapes, level_start_index, res, gout):
  # The barrier keeps XLA from merging the backward's corner gathers with the forward's (CSE): merged, the four
  # (N, Lq, M, L, P, D) gathers of every layer stay alive from the forward to the backward pass (measured on the R50
  # step at 1024 x 1024: 1.36 GiB per encoder layer, 8.2 GiB of the 20.6 GiB peak; BENCHMARKS.md).
  value, loc, attn = jax.lax.optimization_barrier(res)
  gv, gl, ga = _backward(value, loc, attn, spatial_shapes, level_start_index, gout.astype(jnp.float32))
  return gv.astype(value.dtype), gl.astype(loc.dtype), ga.astype(attn.dtype)


_msda.defvjp(_msda_fwd, _msda_bwd)


def ms_deform_attn_xla(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
  """Fast op. value (N, S, M, D); locations (N, Lq, M, L, P, 2); weights (N, Lq, M, L, P) -> (N, Lq, M * D).

  `spatial_shapes` and `level_start_index` are tuples of python ints.
  """
  value = jnp.asarray(value)
  sampling_locations = jnp.asarray(sampling_locations)
  attention_weights = jnp.asarray(attention_weights)
  m = value.shape[2]
  out = _msda(value, sampling_locations, attention_weights, spatial_shapes, level_start_index)  # (N, Lq, M, D)
  # Heads concatenated in order = out.reshape(N, Lq, M * D). Written as a concatenation of per-head slices
  # because XLA:CPU folds a plain reshape (a bitcast) into the gather-reduce loop, which then runs ~3x slower
  # (measured: benchmarks/msda.py; shared/reference/jax_stack.md); the concatenation keeps that loop 4-D.
  return jnp.concatenate([out[:, :, h] for h in range(m)], axis=-1)
