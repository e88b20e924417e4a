"""Point sampling of mask maps (docs/architecture.md, "Losses").

`point_sample` is torch's `grid_sample(mode='bilinear', padding_mode='zeros', align_corners=False)` for points
given in [0, 1] (x, y) of the map: the pixel coordinate is `x * W - 0.5`, and taps outside the map read 0.
`uncertain_point_coords` is PointRend's `get_uncertain_point_coords_with_randomness` with the uncertainty
`-|logit|` that MaskDINO uses.
"""

import concurrent.futures
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from kernels.per_shard import per_shard


def _pixel_taps(points, h, w):
  """points (..., P, 2) (x, y) in [0, 1] of an (h, w) map -> the top-left tap (x0, y0) int32 and the fractions
  (fx, fy) float32 of the bilinear weights, each (..., P) (align_corners=False: pixel coordinate x * W - 0.5)."""
  x = points[..., 0] * w - 0.5
  y = points[..., 1] * h - 0.5
  x0 = jnp.floor(x)
  y0 = jnp.floor(y)
  return x0.astype(jnp.int32), y0.astype(jnp.int32), x - x0, y - y0


def point_sample(maps, points):
  """Bilinear samples of maps at normalized points, with zero padding outside the map.

  maps:   (..., H, W) any real or integer dtype (uint8 / bool GT masks are fine); sampled values are float32.
  points: (..., P, 2) (x, y) in [0, 1] of the map. The leading dims of maps and points broadcast; in particular
          points (P, 2) are shared by every map, and maps (H, W) are shared by every point set.
  Returns (broadcast leading dims..., P) float32.
  """
  maps = jnp.asarray(maps)
  points = jnp.asarray(points, jnp.float32)
  h, w = maps.shape[-2:]
  lead_m, lead_p = maps.shape[:-2], points.shape[:-2]
  flat = maps.reshape(*lead_m, h * w)
  x0, y0, fx, fy = _pixel_taps(points, h, w)
  xs = jnp.stack([x0, x0 + 1, x0, x0 + 1], axis=-1)  # (..., P, 4) the four taps
  ys = jnp.stack([y0, y0, y0 + 1, y0 + 1], axis=-1)
  wts = jnp.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], axis=-1)
  inside = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
  wts = jnp.where(inside, wts, 0.0)
  idx = jnp.clip(ys, 0, h - 1) * w + jnp.clip(xs, 0, w - 1)  # (..., P, 4) flat taps
  n_p = points.shape[-2]
  if not lead_p:  # shared points: one gather along the flattened map axis
    vals = jnp.take(flat, idx.reshape(-1), axis=-1).reshape(*lead_m, n_p, 4)
  elif not lead_m:  # one shared map
    vals = flat[idx]
  else:
    lead = jnp.broadcast_shapes(lead_m, lead_p)
    flat = jnp.broadcast_to(flat, (*lead, h * w))
    idx = jnp.broadcast_to(idx, (*lead, n_p, 4))
    wts = jnp.broadcast_to(wts, (*lead, n_p, 4))
    vals = jnp.take_along_axis(flat, idx.reshape(*lead, n_p * 4), axis=-1).reshape(*lead, n_p, 4)
  return jnp.sum(vals.astype(jnp.float32) * wts, axis=-1)


def point_sample_no_grad(maps, points):
  """`point_sample` for values that take no gradient: the same bilinear samples (equal up to float32 rounding),
  as four gathers of the taps from the zero-padded map instead of one gather of stacked (..., P, 4) taps.

  maps (..., H, W), points (..., P, 2) (x, y) in [0, 1] (inside the map, as uniform draws are; coordinates
  outside [0, 1] are not supported), broadcasting as in `point_sample`; returns float32 (..., P).

  On XLA:CPU the forward is ~9x faster than `point_sample` at PointRend's candidate count (200 maps of 128 x 128,
  37,632 points each: 14 vs 139 ms), because no (..., P, 4) index and weight stacks are built; its backward
  would be four scatter-adds (2.3x slower than `point_sample`'s one), so the losses' gradient path uses
  `point_sample_rows`. Out-of-map taps read the padding's zeros, which is grid_sample's zero padding.
  """
  maps = jnp.asarray(maps)
  points = jnp.asarray(points, jnp.float32)
  h, w = maps.shape[-2:]
  lead_m, lead_p = maps.shape[:-2], points.shape[:-2]
  stride = w + 2  # row length of the padded map
  padded = jnp.pad(maps, [(0, 0)] * len(lead_m) + [(1, 1), (1, 1)]).reshape(*lead_m, (h + 2) * stride)
  x0, y0, fx, fy = _pixel_taps(points, h, w)
  # The top-left tap in the padded map: x0, y0 in [-1, W - 1] / [-1, H - 1] -> padded row / column + 1.
  top_left = (y0 + 1) * stride + (x0 + 1)  # (..., P)
  if not lead_p:  # shared points

    def tap(offset):
      return jnp.take(padded, top_left + offset, axis=-1).astype(jnp.float32)

  elif not lead_m:  # one shared map

    def tap(offset):
      return padded[top_left + offset].astype(jnp.float32)

  else:
    lead = jnp.broadcast_shapes(lead_m, lead_p)
    padded = jnp.broadcast_to(padded, (*lead, padded.shape[-1]))
    top_left = jnp.broadcast_to(top_left, (*lead, top_left.shape[-1]))

    def tap(offset):
      return jnp.take_along_axis(padded, top_left + offset, axis=-1).astype(jnp.float32)

  return ((tap(0) * ((1 - fx) * (1 - fy)) + tap(1) * (fx * (1 - fy))) + tap(stride) * ((1 - fx) * fy)) + tap(
    stride + 1
  ) * (fx * fy)


def _window_corners(points, h, w):
  """points (N, P, 2) (x, y) in [0, 1] of an (h, w) map -> the top-left (row, column) of each point's 2 x 2 window of
  taps in the map zero-padded by one pixel, (N, P, 2) int32, and the window's bilinear weights (N, P, 2, 2)."""
  x0, y0, fx, fy = _pixel_taps(points, h, w)  # (N, P) each; in the padded map the window starts at (y0 + 1, x0 + 1)
  wy = jnp.stack([1 - fy, fy], axis=-1)  # (N, P, 2) row weights
  wx = jnp.stack([1 - fx, fx], axis=-1)  # (N, P, 2) column weights
  return jnp.stack([y0 + 1, x0 + 1], axis=-1), wy[..., :, None] * wx[..., None, :]


_WINDOW_GATHER = jax.lax.GatherDimensionNumbers(
  offset_dims=(2, 3),
  collapsed_slice_dims=(),
  start_index_map=(1, 2),
  operand_batching_dims=(0,),
  start_indices_batching_dims=(0,),
)
_WINDOW_SCATTER = jax.lax.ScatterDimensionNumbers(
  update_window_dims=(2, 3),
  inserted_window_dims=(),
  scatter_dims_to_operand_dims=(1, 2),
  operand_batching_dims=(0,),
  scatter_indices_batching_dims=(0,),
)


def point_sample_windows(maps, points):
  """`point_sample` of one point set per map: maps (N, H, W) any real or integer dtype, points (N, P, 2) (x, y) in
  [0, 1] (inside the map, as uniform draws are) -> (N, P) float32, by one windowed gather of each point's 2 x 2 taps
  from the zero-padded map and a weighted sum over the window (a reduction: XLA writes the samples once rather
  than fusing the gathers into each consumer). With a gradient for float maps (`point_sample_rows`)."""
  n, h, w = maps.shape
  corners, weights = _window_corners(points, h, w)
  padded = jnp.pad(maps, ((0, 0), (1, 1), (1, 1)))  # (N, H + 2, W + 2)
  taps = jax.lax.gather(
    padded, corners, _WINDOW_GATHER, (1, 2, 2), mode=jax.lax.GatherScatterMode.FILL_OR_DROP
  )  # (N, P, 2, 2)
  return jnp.sum(taps.astype(jnp.float32) * weights, axis=(-2, -1))


@jax.custom_vjp
def point_sample_rows(maps, points):
  """`point_sample_windows` of float32 maps with the maps' gradient as one windowed scatter-add of each point's
  2 x 2 bilinear weights into the padded map (no (N, P, 4) stacks of taps, indices and weights, which autodiff of
  `point_sample` builds in the forward and again in the rematerialized backward). The points take no gradient (the
  losses' points are stop-gradient draws). Equal to `point_sample` and its gradient up to float32 rounding
  (tests/losses/test_point_sampling.py).
  """
  return point_sample_windows(maps, points)


def _point_sample_rows_fwd(maps, points):
  return point_sample_windows(maps, points), (points, maps.shape)


def _point_sample_rows_bwd(res, g):
  points, (n, h, w) = res
  corners, weights = _window_corners(points, h, w)
  padded = jnp.zeros((n, h + 2, w + 2), g.dtype)
  padded = jax.lax.scatter_add(
    padded, corners, g[..., None, None] * weights, _WINDOW_SCATTER, mode=jax.lax.GatherScatterMode.FILL_OR_DROP
  )
  return padded[:, 1:-1, 1:-1], None


point_sample_rows.defvjp(_point_sample_rows_fwd, _point_sample_rows_bwd)


def pixel_centers(h, w):
  """The centres of every pixel of an (h, w) map as normalized (x, y) points, row-major: (h * w, 2) float32.

  Sampling a map of that size at these points returns its pixels exactly (`point_sample` taps one pixel with
  weight 1), so losses "at every pixel" are point-sampled losses with this fixed point set.
  """
  ys, xs = jnp.meshgrid((jnp.arange(h) + 0.5) / h, (jnp.arange(w) + 0.5) / w, indexing='ij')
  return jnp.stack([xs.reshape(-1), ys.reshape(-1)], axis=-1).astype(jnp.float32)


def _mix32(x):
  """A bijective 32-bit integer hash (the 'lowbias32' xorshift-multiply finalizer of C. Wellons' hash prospector)."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def hashed_uniform(key, shape):
  """Uniform float32 values in [0, 1) of `shape`, the i-th a hash of (i, key): a counter-based generator for the
  many draws of PointRend's point sampling.

  Two 32-bit seeds come from the key (one small threefry draw); element i is mix(mix(i + s0) ^ s1), whose top 24
  bits give the value. jax.random.uniform (threefry, 20 rounds per pair of words) took 196 ms for the loop step's
  (200, 40,768, 2) draws of the R50 training step on the 2-core CPU, this 21 ms (BENCHMARKS.md, session 16). A
  statistical generator, not a cryptographic one: tests/losses/test_point_sampling.py checks uniformity (KS) and
  independence of neighbouring values and of keys.
  """
  size = math.prod(shape)
  if size >= 1 << 32:
    raise ValueError(f'hashed_uniform: {size} values exceed the 32-bit counter')
  seeds = jax.random.bits(key, (2,), jnp.uint32)
  x = _mix32(_mix32(jax.lax.iota(jnp.uint32, size) + seeds[0]) ^ seeds[1])
  return ((x >> 8).astype(jnp.float32) * (1.0 / (1 << 24))).reshape(shape)


def num_uniform_draws(num_points, oversample_ratio, importance_sample_ratio):
  """How many uniform (x, y) draws `uncertain_point_coords` uses per map: oversampled + fresh random points."""
  num_uncertain = int(importance_sample_ratio * num_points)
  num_sampled = int(num_points * oversample_ratio) if num_uncertain > 0 else 0
  return num_sampled + num_points - num_uncertain


def uncertain_point_coords(logits, rng, num_points, oversample_ratio, importance_sample_ratio, uniform=None):
  """PointRend importance sampling of points on mask logits, without gradient (docs/architecture.md, "Losses").

  Draws int(num_points * oversample_ratio) uniform points per map, keeps the int(importance_sample_ratio *
  num_points) with the largest uncertainty -|logit| (bilinearly sampled), and appends fresh uniform points up to
  num_points.

  logits: (N, H, W). rng: PRNG key, or None when `uniform` (N, num_uniform_draws(...), 2) values in [0, 1) are
  given instead (the criterion draws every random number of a step at once: each separate jax.random call
  costs seconds of XLA:CPU compile time). Returns (N, num_points, 2) (x, y) in [0, 1], stop-gradient.
  """
  logits = jax.lax.stop_gradient(jnp.asarray(logits, jnp.float32))
  n = logits.shape[0]
  num_uncertain = int(importance_sample_ratio * num_points)
  num_sampled = int(num_points * oversample_ratio) if num_uncertain > 0 else 0
  if num_uncertain > num_sampled:
    raise ValueError(
      f'uncertain_point_coords: importance_sample_ratio * num_points = {num_uncertain} exceeds the '
      f'{num_sampled} oversampled points; use oversample_ratio >= importance_sample_ratio'
    )
  total = num_uniform_draws(num_points, oversample_ratio, importance_sample_ratio)
  if uniform is None:
    uniform = jax.random.uniform(rng, (n, total, 2), jnp.float32)
  elif uniform.shape != (n, total, 2):
    raise ValueError(f'uncertain_point_coords: uniform has shape {uniform.shape}, expected {(n, total, 2)}')
  uniform = jax.lax.stop_gradient(uniform)
  parts = []
  if num_uncertain > 0:
    coords = uniform[:, :num_sampled]  # (N, num_sampled, 2)
    uncertainty = -jnp.abs(point_sample_no_grad(logits, coords))  # (N, num_sampled)
    top = top_k_indices(uncertainty, num_uncertain)  # (N, num_uncertain)
    parts.append(jnp.take_along_axis(coords, top[..., None], axis=1))
  parts.append(uniform[:, num_sampled:])  # the fresh uniform points
  return jnp.concatenate(parts, axis=1)


def _kth_largest(rows, k, stride=16):
  """rows (r, n) float32 without NaN -> (r,) the k-th largest value of each row, equal to np.partition's.

  A bracket from a subsample: of every stride-th value, the ranks around k's expected rank (6 binomial standard
  deviations either side) give lo <= hi per row; the values above hi are counted and the k-th is selected among the
  few inside [lo, hi] (about 1/8 of a row at PointRend's sizes). A row whose bracket misses, and rows too short to
  subsample, take np.partition of the whole row. At PointRend's sizes (200 rows of 37,632, k = 9,408) 34 against
  45 ms for np.partition on one thread, and the host top-k below 38-50 -> 26-29 ms (ad hoc, real values)."""
  r, n = rows.shape
  sub = rows[:, ::stride]  # (r, m)
  m = sub.shape[1]
  p = k / n
  margin = int(6 * math.sqrt(m * p * (1 - p))) + 8
  hi_rank, lo_rank = int(p * m) - margin, math.ceil(p * m) + margin  # 1-based ranks from the top
  if n < 4096 or hi_rank < 1 or lo_rank > m:
    return np.partition(rows, n - k, axis=-1)[:, n - k]
  part = np.partition(sub, [m - lo_rank, m - hi_rank], axis=-1)
  lo, hi = part[:, m - lo_rank, None], part[:, m - hi_rank, None]  # (r, 1)
  above = np.count_nonzero(rows > hi, axis=-1)  # (r,)
  inside = (rows >= lo) & (rows <= hi)  # (r, n)
  out = np.empty(r, rows.dtype)
  for i in range(r):
    need = k - above[i]  # the k-th largest of the row is the need-th largest inside its bracket
    band = rows[i][inside[i]]
    if 0 < need <= band.size:
      out[i] = np.partition(band, band.size - need)[band.size - need]
    else:  # the bracket missed
      out[i] = np.partition(rows[i], n - k)[n - k]
  return out


def _host_top_k(values, k):
  """NumPy: the index set of lax.top_k(values, k) for values (..., n) float32 -> (..., k) int32, ascending.

  The k-th largest value by a selection (`_kth_largest`), then every index above it and, of those equal to it, the
  lowest ones (as top_k breaks ties), in ascending index order."""
  values = np.asarray(values, np.float32)
  if np.isnan(values).any():  # NaN (a diverged step) above everything, as lax's sort
    values = np.where(np.isnan(values), np.inf, values)
  lead, n = values.shape[:-1], values.shape[-1]
  rows = values.reshape(-1, n)
  out = np.empty((rows.shape[0], k), np.int32)

  def chunk(start, stop):
    v = rows[start:stop]
    kth = _kth_largest(v, k)[:, None]  # (r, 1) the k-th largest
    chosen = v >= kth  # (r, n): exactly k per row unless values tie at the k-th
    for r in np.flatnonzero(np.sum(chosen, axis=-1) > k):  # ties at the cut: keep the lowest indices
      equal = np.flatnonzero(v[r] == kth[r])
      chosen[r, equal[k - np.sum(v[r] > kth[r]) :]] = False
    flat = np.flatnonzero(chosen).reshape(stop - start, k)  # row-major: each row ascending
    out[start:stop] = flat - (np.arange(stop - start) * n)[:, None]

  workers = max(1, min(os.cpu_count() or 1, rows.shape[0] // 8))
  bounds = np.linspace(0, rows.shape[0], workers + 1).astype(int)
  if workers == 1:
    chunk(0, rows.shape[0])
  else:  # NumPy's partition releases the GIL
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      list(pool.map(chunk, bounds[:-1], bounds[1:]))
  return out.reshape(*lead, k)


def top_k_indices(values, k):
  """The indices of the k largest values of each row, values (N, n) float32 -> (N, k) int32: lax.top_k's index
  set (ties broken towards the lower index, as it does), in ascending index order on a CPU and in top_k's order
  (largest first) elsewhere. Their consumers sum over the points, so the order moves only the sums' rounding.

  XLA:CPU's TopK sorts each row: ~2.2 ms per row of PointRend's 37,632 candidates (k = 9,408), 3.3 s of the R50
  training step (BENCHMARKS.md). On a CPU the rows go to NumPy in one host callback (a linear-time selection);
  on other platforms lax.top_k.
  """

  def host(v):
    shape = jax.ShapeDtypeStruct(v.shape[:-1] + (k,), jnp.int32)
    return jax.pure_callback(lambda x: _host_top_k(x, k), shape, v, vmap_method='broadcast_all')

  def device(v):
    return jax.lax.top_k(v, k)[1]

  on_cpu = per_shard(host, (0,), 0)
  return jax.lax.platform_dependent(values, cpu=on_cpu, default=device)
