"""Fast pure-JAX multi-scale deformable attention with a hand-written backward (`jax.custom_vjp`).

Same semantics as `reference.py` (torch `grid_sample`, bilinear, zero padding, align_corners=False;
docs/architecture.md, "Deformable attention"). Formulation, chosen by measurement on XLA:CPU (benchmarks/msda.py,
docs/jax_notes.md):

* value is viewed as rows of D channels, `(N * S * M, D)`, so one sample corner is one contiguous row; the row
  of pixel (h, w) of level l, head m, batch n is `(n * S + start_l + h * W_l + w) * M + m`;
* the index math is vectorized over levels (per-level H, W and start offsets are small constant arrays
  broadcast along the L axis), giving one index array and one weight array per bilinear corner (four gathers
  in all, no `jnp.stack` in the index math); the four weighted gathers are reduced over (L, P) and summed in
  one expression into a 4-D `(N, Lq, M, D)` result, turned into `(N, Lq, M * D)` last by concatenating the
  heads (a plain reshape gets folded into the gather loop by XLA:CPU and costs ~3x). Compared with one gather
  per (level, corner), this compiles 3-7x faster and runs at least as fast;
* the backward recomputes indices and weights, gets the location and attention gradients from per-corner dot
  products <value row, output cotangent>, and the value gradient from scatter-adds of `weight * cotangent` for
  all corners at once: on CPUs over chunks of queries, two disjoint groups per chunk (`value_grad`: 2.7x faster
  than one scatter of every update at the encoder size); on GPUs in one scatter.

An optional per-head bias of the value, `value_bias` (M, D) (the bias of the value projection), is added to each
gathered row inside the gather-reduce loop rather than to the value before it: measured on XLA:CPU, a value
that is `dot + bias` gets the bias add fused into the gather's operand, and that loop then runs 6-8x slower (one
R50 encoder layer at 800 x 1216: 1.5 s instead of 0.2 s; BENCHMARKS.md, docs/jax_notes.md); gathering the
projection's raw output and adding the bias to the gathered row is the same float operation per element.

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


def _gather_rows(rows, idx, bias):
  """rows (R, D) gathered at idx (N, Lq, M, L, P) plus bias (M, D) in the rows' dtype -> (N, Lq, M, L, P, D) f32."""
  m, d = bias.shape
  g = rows.at[idx].get(mode='promise_in_bounds') + bias.reshape(1, 1, m, 1, 1, d).astype(rows.dtype)
  return g.astype(jnp.float32)


def _forward(value, bias, loc, attn, spatial_shapes, level_start_index):
  """value (N, S, M, D) without its bias (M, D). Returns (N, Lq, M, D) float32."""
  n, s, m, d = value.shape
  rows = value.reshape(n * s * m, d)
  base = _row_base(n, s, m)
  loc = loc.astype(jnp.float32)
  attn = attn.astype(jnp.float32)
  out = None
  for off, wx, wy, _, _ in _corners(loc, spatial_shapes, level_start_index, m):
    g = _gather_rows(rows, base + off, bias)  # (N, Lq, M, L, P, D)
    term = jnp.sum(g * (attn * wx * wy)[..., None], axis=(3, 4))  # (N, Lq, M, D)
    out = term if out is None else out + term
  return out


# Bytes of scatter updates per chunk and group of the chunked value gradient (`value_grad`). Measured on the 2-core
# CPU at the encoder size (benchmarks/msda.py, BENCHMARKS.md): one scatter of all 1.4 GB of updates 546 ms; chunks of
# this size in two groups about 200 ms (the updates stay in cache, and the two groups' scatters run at once).
CHUNK_BYTES = 8 << 20
# Up to this many chunks' worth of updates, one scatter is as fast on that CPU (at the decoder size, 26 MB of
# updates, the two agree within the noise).
SINGLE_SCATTER_CHUNKS = 8


def _updates(loc, attn, gout, spatial_shapes, level_start_index, shape):
  """Scatter indices and updates of the value gradient: `attn * corner weight * cotangent` for each corner.

  loc (N, Q, M, L, P, 2), attn (N, Q, M, L, P), gout (N, Q, M, D), all float32; shape = the value's (N, S, M, D).
  Returns idx (N, Q, M, 4, L * P) int32 rows of the (N * S * M, D) view and upd (N, Q, M, 4, L * P, D) float32.
  """
  n, s, m, _ = shape
  q = loc.shape[1]
  corners = _corners(loc, spatial_shapes, level_start_index, m)
  base = _row_base(n, s, m)
  idx = jnp.concatenate([(base + off).reshape(n, q, m, 1, -1) for off, *_ in corners], axis=3)
  coef = jnp.concatenate([(attn * wx * wy).reshape(n, q, m, 1, -1) for _, wx, wy, _, _ in corners], axis=3)
  return idx, coef[..., None] * gout[:, :, :, None, None, :]


def value_grad(shape, loc, attn, gout, spatial_shapes, level_start_index, chunk_bytes=CHUNK_BYTES):
  """The value gradient (N, S, M, D) float32 of value shape `shape`; loc, attn, gout as in `_updates`.

  chunk_bytes=None (GPUs), or at most SINGLE_SCATTER_CHUNKS chunks of updates: one scatter-add of all updates.
  Otherwise (CPUs) the queries are processed in chunks by a `lax.scan` whose updates take about chunk_bytes each,
  so they never exist all at once (1.4 GB at the encoder size: writing and reading that much memory, page faults
  included, cost more than the scatter), and each chunk is split in two groups that write disjoint rows (the
  heads' halves, else the batch's): two independent scatters, which XLA:CPU runs concurrently. Padding queries (to
  a whole number of chunks) have weight 0.
  """
  n, s, m, d = shape
  loc = loc.astype(jnp.float32)
  attn = attn.astype(jnp.float32)
  gout = gout.astype(jnp.float32)
  q, nl, npt = loc.shape[1], loc.shape[3], loc.shape[4]
  if chunk_bytes is None or n * q * m * 4 * nl * npt * d * 4 <= SINGLE_SCATTER_CHUNKS * chunk_bytes:
    idx, upd = _updates(loc, attn, gout, spatial_shapes, level_start_index, shape)
    return jnp.zeros((n * s * m, d), jnp.float32).at[idx].add(upd, mode='promise_in_bounds').reshape(shape)
  if m % 2 == 0:
    axis, sub = 2, (n, s, m // 2, d)  # two groups of heads
  elif n % 2 == 0:
    axis, sub = 0, (n // 2, s, m, d)  # two halves of the batch
  else:
    axis, sub = None, shape
  groups = [slice(None)] if axis is None else [slice(0, shape[axis] // 2), slice(shape[axis] // 2, None)]
  per_query = sub[0] * sub[2] * 4 * nl * npt * d * 4  # update bytes of one query in one group
  cq = max(1, min(q, int(chunk_bytes) // per_query))
  chunks = -(-q // cq)

  def chunked(x):  # (N, Q, ...) -> (chunks, N, cq, ...), zero padded
    x = jnp.pad(x, [(0, 0), (0, chunks * cq - q)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(n, chunks, cq, *x.shape[2:]).swapaxes(0, 1)

  def body(accs, xs):
    out = []
    for acc, g in zip(accs, groups):
      part = [x[(slice(None),) * axis + (g,)] if axis is not None else x for x in xs]
      idx, upd = _updates(*part, spatial_shapes, level_start_index, sub)
      out.append(acc.at[idx].add(upd, mode='promise_in_bounds'))
    return tuple(out), None

  # zeros_like: inside a shard_map (kernels/per_shard.py, one shard per device) the scanned inputs vary over the
  # mesh's data axis, and so must the carry (scan checks that its carry keeps its type); outside, plain zeros.
  zeros = tuple(jnp.zeros_like(gout, shape=(sub[0] * s * sub[2], d)) for _ in groups)
  accs, _ = jax.lax.scan(body, zeros, (chunked(loc), chunked(attn), chunked(gout)))
  return jnp.concatenate([a.reshape(sub) for a in accs], axis=axis or 0)


def _backward(value, bias, loc, attn, spatial_shapes, level_start_index, gout, chunk_bytes=CHUNK_BYTES):
  """gout (N, Lq, M, D) float32. Returns (grad_value, grad_loc, grad_attn) in float32; chunk_bytes: `value_grad`.
  The bias's gradient is grad_value summed over (N, S)."""
  n, s, m, d = value.shape
  rows = value.reshape(n * s * m, d)
  base = _row_base(n, s, m)
  loc = loc.astype(jnp.float32)
  attn = attn.astype(jnp.float32)
  hs, ws, _ = _level_consts(spatial_shapes, level_start_index, m)
  g6 = gout[:, :, :, None, None, :]  # (N, Lq, M, 1, 1, D)
  ga = gx = gy = 0.0
  corners = _corners(loc, spatial_shapes, level_start_index, m)
  for off, wx, wy, dwx, dwy in corners:
    v = _gather_rows(rows, base + off, bias)  # (N, Lq, M, L, P, D)
    gv = jnp.sum(v * g6, axis=-1)  # (N, Lq, M, L, P): <value row, cotangent>
    wc = wx * wy
    ga = ga + wc * gv
    gx = gx + dwx * wy * gv
    gy = gy + wx * dwy * gv
  grad_value = value_grad(value.shape, loc, attn, gout, spatial_shapes, level_start_index, chunk_bytes)
  grad_loc = jnp.stack([gx * attn * ws.astype(np.float32), gy * attn * hs.astype(np.float32)], axis=-1)
  return grad_value, grad_loc, ga


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _msda(value, bias, loc, attn, spatial_shapes, level_start_index, chunk_bytes):
  return _forward(value, bias, loc, attn, spatial_shapes, level_start_index).astype(value.dtype)


def _msda_fwd(value, bias, loc, attn, spatial_shapes, level_start_index, chunk_bytes):
  out = _forward(value, bias, loc, attn, spatial_shapes, level_start_index).astype(value.dtype)
  return out, (value, bias, loc, attn)


def _msda_bwd(spatial_shapes, level_start_index, chunk_bytes, res, gout):
  # The barrier keeps XLA from merging the backward's corner gathers with the forward's (CSE): merged, the four
  # (N, Lq, M, L, P, D) gathers of every layer stay alive from the forward to the backward pass (measured on the R50
  # step at 1024 x 1024: 1.36 GiB per encoder layer, 8.2 GiB of the 20.6 GiB peak; BENCHMARKS.md).
  value, bias, loc, attn = jax.lax.optimization_barrier(res)
  g = gout.astype(jnp.float32)
  gv, gl, ga = _backward(value, bias, loc, attn, spatial_shapes, level_start_index, g, chunk_bytes)
  gb = jnp.sum(gv, axis=(0, 1))  # (M, D)
  return gv.astype(value.dtype), gb.astype(bias.dtype), gl.astype(loc.dtype), ga.astype(attn.dtype)


_msda.defvjp(_msda_fwd, _msda_bwd)


def ms_deform_attn_xla(
  value,
  spatial_shapes,
  level_start_index,
  sampling_locations,
  attention_weights,
  chunk_bytes=CHUNK_BYTES,
  value_bias=None,
):
  """Fast op. value (N, S, M, D); locations (N, Lq, M, L, P, 2); weights (N, Lq, M, L, P) -> (N, Lq, M * D).

  `spatial_shapes` and `level_start_index` are tuples of python ints; `chunk_bytes`: how the backward computes the
  value gradient (`value_grad`: chunked for CPUs, None for one scatter on GPUs); `value_bias`: None or (M, D), the
  op then samples `value + value_bias` (added per gathered row, see the module docstring).
  """
  value = jnp.asarray(value)
  sampling_locations = jnp.asarray(sampling_locations)
  attention_weights = jnp.asarray(attention_weights)
  m, d = value.shape[2:]
  # No bias: zeros, a constant whose add XLA removes (the same program as without the argument). zeros_like(value):
  # inside a shard_map (kernels/per_shard.py) the bias, replicated, is made to vary like the value before the
  # custom VJP, whose backward returns a per-shard bias gradient; autodiff then sums it over the shards (the
  # transpose of that cast), as it does for any replicated operand.
  if value_bias is None:
    bias = jnp.zeros_like(value, shape=(m, d))
  else:
    bias = jnp.asarray(value_bias)
    bias = bias + jnp.zeros_like(value, shape=(m, d), dtype=bias.dtype)
  out = _msda(value, bias, sampling_locations, attention_weights, spatial_shapes, level_start_index, chunk_bytes)
  # out: (N, Lq, M, D)
  # Heads concatenated in order = out.reshape(N, Lq, M * D). Written as a concatenation of per-head slices
  # because XLA:CPU folds a plain reshape (a bitcast) into the gather-reduce loop, which then runs ~3x slower
  # (measured: benchmarks/msda.py; docs/jax_notes.md); the concatenation keeps that loop 4-D.
  return jnp.concatenate([out[:, :, h] for h in range(m)], axis=-1)
