"""Tests of kernels.ms_deform_attn against a float64 NumPy oracle written from the definition.

The oracle is torch `grid_sample(bilinear, zeros, align_corners=False)` per level (docs/architecture.md,
"Deformable attention"): pixel x = loc_x * W - 0.5, y = loc_y * H - 0.5; four neighbours with bilinear weights; a
neighbour outside the map contributes 0. Its analytic backward is itself checked against central finite differences.
"""

import functools
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.ms_deform_attn import dense as dense_module
from kernels.ms_deform_attn import ms_deform_attn
from kernels.ms_deform_attn.dense import dense_fits

IMPLS = ('xla', 'dense', 'reference', 'pallas')  # 'pallas' runs with interpret=True on CPU
SHAPES = ((5, 7), (3, 4), (2, 2))  # non-square, non-power-of-2 levels


# ----------------------------------------------------------------------------------------------------------
# float64 NumPy oracle


def _corners_np(x, y, h, w):
  """Yields (yi, xi, weight, valid, d weight/dx, d weight/dy) for the 4 bilinear corners of pixel coords x, y."""
  x0 = np.floor(x)
  y0 = np.floor(y)
  fx = x - x0
  fy = y - y0
  x0 = x0.astype(np.int64)
  y0 = y0.astype(np.int64)
  for dy in (0, 1):
    for dx in (0, 1):
      xi = x0 + dx
      yi = y0 + dy
      wx = fx if dx else 1 - fx
      wy = fy if dy else 1 - fy
      dwx = 1.0 if dx else -1.0
      dwy = 1.0 if dy else -1.0
      valid = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
      yield yi, xi, wx * wy, valid, dwx * wy, wx * dwy


def np_forward(value, shapes, loc, attn):
  """value (N, S, M, D); loc (N, Lq, M, L, P, 2); attn (N, Lq, M, L, P) -> (N, Lq, M * D), float64."""
  value, loc, attn = (np.asarray(a, np.float64) for a in (value, loc, attn))
  n, _, m, d = value.shape
  lq = loc.shape[1]
  out = np.zeros((n, lq, m, d))
  start = 0
  for lvl, (h, w) in enumerate(shapes):
    img = value[:, start : start + h * w].reshape(n, h, w, m, d)
    start += h * w
    for b in range(n):
      for hd in range(m):
        x = loc[b, :, hd, lvl, :, 0] * w - 0.5  # (Lq, P)
        y = loc[b, :, hd, lvl, :, 1] * h - 0.5
        a = attn[b, :, hd, lvl]  # (Lq, P)
        for yi, xi, wc, valid, _, _ in _corners_np(x, y, h, w):
          pix = img[b, np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1), hd]  # (Lq, P, D)
          out[b, :, hd] += np.sum((a * wc * valid)[..., None] * pix, axis=1)
  return out.reshape(n, lq, m * d)


def np_backward(value, shapes, loc, attn, cot):
  """Gradients of sum(forward * cot) w.r.t. (value, loc, attn), analytic, float64."""
  value, loc, attn, cot = (np.asarray(a, np.float64) for a in (value, loc, attn, cot))
  n, s, m, d = value.shape
  lq = loc.shape[1]
  cot = cot.reshape(n, lq, m, d)
  gval = np.zeros_like(value)
  gloc = np.zeros_like(loc)
  gatt = np.zeros_like(attn)
  start = 0
  for lvl, (h, w) in enumerate(shapes):
    img = value[:, start : start + h * w].reshape(n, h, w, m, d)
    gimg = np.zeros_like(img)
    for b in range(n):
      for hd in range(m):
        x = loc[b, :, hd, lvl, :, 0] * w - 0.5
        y = loc[b, :, hd, lvl, :, 1] * h - 0.5
        a = attn[b, :, hd, lvl]
        g = cot[b, :, hd][:, None, :]  # (Lq, 1, D)
        for yi, xi, wc, valid, dwx, dwy in _corners_np(x, y, h, w):
          yc, xc = np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)
          pix = img[b, yc, xc, hd] * valid[..., None]  # (Lq, P, D)
          gv = np.sum(pix * g, axis=-1)  # (Lq, P)
          gatt[b, :, hd, lvl] += wc * gv
          gloc[b, :, hd, lvl, :, 0] += a * dwx * gv * w
          gloc[b, :, hd, lvl, :, 1] += a * dwy * gv * h
          np.add.at(gimg[b, :, :, hd], (yc, xc), (a * wc * valid)[..., None] * g)
    gval[:, start : start + h * w] = gimg.reshape(n, h * w, m, d)
    start += h * w
  return gval, gloc, gatt


def make_inputs(seed, n=2, lq=9, m=3, d=4, p=2, shapes=SHAPES, dtype=np.float32):
  """Random inputs; about 20% of sample points have a coordinate outside [0, 1], a few far outside."""
  rng = np.random.default_rng(seed)
  s = sum(h * w for h, w in shapes)
  nl = len(shapes)
  value = rng.normal(size=(n, s, m, d))
  loc = rng.uniform(-0.06, 1.06, size=(n, lq, m, nl, p, 2))
  far = rng.uniform(size=loc.shape) < 0.02
  loc = np.where(far, rng.uniform(-3.0, 4.0, size=loc.shape), loc)
  logits = rng.normal(size=(n, lq, m, nl * p))
  attn = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  attn = attn.reshape(n, lq, m, nl, p)
  return value.astype(dtype), loc.astype(dtype), attn.astype(dtype)


def _outside_fraction(loc):
  return float(np.mean(np.any((loc < 0) | (loc > 1), axis=-1)))


def _assert_close(actual, expected, rtol, name):
  """Max abs error relative to the largest magnitude of the expected tensor."""
  actual = np.asarray(actual, np.float64)
  scale = max(1.0, float(np.max(np.abs(expected))))
  err = float(np.max(np.abs(actual - expected)))
  assert err <= rtol * scale, f'{name}: max abs err {err:.3g} > {rtol} * {scale:.3g}'


# ----------------------------------------------------------------------------------------------------------
# The oracle itself


def test_oracle_backward_matches_finite_differences():
  # Central differences in float64 with eps 1e-6: truncation error is 0 for the bilinear map away from its
  # kinks (random coordinates almost surely are), rounding error ~1e-10; 1e-6 leaves a wide margin.
  value, loc, attn = (a.astype(np.float64) for a in make_inputs(1, n=1, lq=3, m=2, d=3, p=2))
  cot = np.random.default_rng(2).normal(size=(1, 3, 2 * 3))
  grads = np_backward(value, SHAPES, loc, attn, cot)
  eps = 1e-6
  for arg, grad in enumerate(grads):
    inputs = [value, loc, attn]
    fd = np.zeros_like(grad)
    for i in np.ndindex(grad.shape):
      plus = [x.copy() for x in inputs]
      minus = [x.copy() for x in inputs]
      plus[arg][i] += eps
      minus[arg][i] -= eps
      fp = np.sum(np_forward(plus[0], SHAPES, plus[1], plus[2]) * cot)
      fm = np.sum(np_forward(minus[0], SHAPES, minus[1], minus[2]) * cot)
      fd[i] = (fp - fm) / (2 * eps)
    np.testing.assert_allclose(grad, fd, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Random inputs against the oracle

CASES = [
  # (n, lq, m, d, p, shapes)
  (2, 9, 3, 4, 2, SHAPES),
  (1, 7, 1, 5, 1, SHAPES),
  (1, 5, 8, 2, 4, SHAPES),
  (2, 4, 2, 3, 3, ((1, 1), (6, 5))),
]


@functools.cache
def _fwd_vjp(impl, shapes):
  """One jitted function returning (output, (grad_value, grad_loc, grad_attn)) for cotangent `cot`."""

  def f(v, lc, a):
    return ms_deform_attn(v, shapes, None, lc, a, impl=impl)

  def run(v, lc, a, cot):
    out, vjp = jax.vjp(f, v, lc, a)
    return out, vjp(cot)

  return jax.jit(run)


# Every case for 'xla' and 'reference'; two for 'pallas' (its backward is the 'xla' one) to keep the suite fast.
@pytest.mark.parametrize(
  'impl,case', [(i, c) for i in IMPLS for c in range(len(CASES)) if i != 'pallas' or c in (0, 3)]
)
def test_forward_and_grads_match_oracle_float32(impl, case):
  n, lq, m, d, p, shapes = CASES[case]
  value, loc, attn = make_inputs(10 + case, n=n, lq=lq, m=m, d=d, p=p, shapes=shapes)
  assert 0.1 < _outside_fraction(loc) < 0.35
  cot = np.random.default_rng(20 + case).normal(size=(n, lq, m * d)).astype(np.float32)
  out, grads = _fwd_vjp(impl, shapes)(value, loc, attn, cot)
  assert out.shape == (n, lq, m * d) and out.dtype == jnp.float32
  # float32 computation vs float64 oracle, O(1) values summed over <= 4 * L * P terms: errors ~1e-6.
  _assert_close(out, np_forward(value, shapes, loc, attn), 1e-5, 'out')
  expected = np_backward(value, shapes, loc, attn, cot)
  # Gradients: same float32 rounding; the location gradient is scaled by W or H (<= 7), still ~1e-6 relative.
  for name, g, e in zip(('value', 'loc', 'attn'), grads, expected):
    assert g.shape == e.shape and g.dtype == jnp.float32
    _assert_close(g, e, 1e-5, f'grad_{name}')


@pytest.mark.parametrize('impl', IMPLS)
def test_bfloat16(impl):
  value, loc, attn = make_inputs(3, n=1, lq=8, m=2, d=8, p=4)
  bf = [jnp.asarray(a, jnp.bfloat16) for a in (value, loc, attn)]
  # The oracle sees the bf16-rounded inputs exactly, so only the op's own error is measured.
  exact = [np.asarray(a.astype(jnp.float32), np.float64) for a in bf]
  cot = jnp.asarray(np.random.default_rng(4).normal(size=(1, 8, 16)), jnp.bfloat16)
  out, grads = _fwd_vjp(impl, SHAPES)(*bf, cot)
  assert out.dtype == jnp.bfloat16
  # Accumulation is float32; the only large error is the final rounding to bf16 (2^-8 relative = 0.4%);
  # 1e-2 of the output scale allows that with margin.
  _assert_close(out.astype(jnp.float32), np_forward(exact[0], SHAPES, exact[1], exact[2]), 1e-2, 'out')
  expected = np_backward(exact[0], SHAPES, exact[1], exact[2], np.asarray(cot.astype(jnp.float32)))
  for name, g, e, x in zip(('value', 'loc', 'attn'), grads, expected, bf):
    assert g.dtype == x.dtype
    # bf16 result rounding (0.4%) plus, for 'reference', bf16 accumulation in autodiff's scatter-add for the
    # value gradient (a few terms per pixel here); 2e-2 of the gradient's scale.
    _assert_close(g.astype(jnp.float32), e, 2e-2, f'grad_{name}')


# ----------------------------------------------------------------------------------------------------------
# Hand-computed cases


@functools.cache
def _jit_op(impl, shapes):
  return jax.jit(lambda v, lc, a: ms_deform_attn(v, shapes, None, lc, a, impl=impl))


def _sample(value_maps, shapes, locs, impl):
  """value_maps: per level an (H, W, D) array; locs: per query a list of one (x, y) per level.

  One head, one point per level, attention 1 everywhere; returns (Q, D): the sum over levels of the samples.
  """
  d = value_maps[0].shape[-1]
  value = np.concatenate([v.reshape(-1, d) for v in value_maps])[None, :, None, :].astype(np.float32)
  q, nl = len(locs), len(shapes)
  loc = np.asarray(locs, np.float32).reshape(1, q, 1, nl, 1, 2)
  attn = np.ones((1, q, 1, nl, 1), np.float32)
  return np.asarray(_jit_op(impl, shapes)(value, loc, attn))[0]


@pytest.mark.parametrize('impl', IMPLS)
def test_single_pixel_map(impl):
  v = np.array([[[2.0, -3.0]]])  # (1, 1, 2)
  out = _sample([v], ((1, 1),), [[(0.5, 0.5)], [(0.25, 0.5)], [(0.75, 0.75)], [(1.0, 0.5)], [(1.5, 0.5)]], impl)
  # The center of the only pixel returns it exactly.
  np.testing.assert_array_equal(out[0], [2.0, -3.0])
  # x = 0.25 * 1 - 0.5 = -0.25: the pixel is the right neighbour with weight 0.75; the left one is outside.
  np.testing.assert_allclose(out[1], [1.5, -2.25], rtol=1e-6)
  # x = y = 0.25: the pixel is the top-left neighbour with weight 0.75 * 0.75.
  np.testing.assert_allclose(out[2], 0.5625 * v[0, 0], rtol=1e-6)
  # Right edge: half weight; a full pixel beyond it: zero.
  np.testing.assert_allclose(out[3], 0.5 * v[0, 0], rtol=1e-6)
  np.testing.assert_array_equal(out[4], 0.0)


@pytest.mark.parametrize('impl', IMPLS)
def test_edge_half_weight_far_outside_and_pixel_centers(impl):
  h, w = 3, 4
  v = np.arange(h * w * 2, dtype=np.float64).reshape(h, w, 2) + 1.0
  locs, expected = [], []
  for i in range(h):
    # loc_x = 0 is the left edge of the map: x = -0.5, halfway between pixel 0 and the zero padding.
    locs.append([(0.0, (i + 0.5) / h)])
    expected.append(0.5 * v[i, 0])
    # loc_x = 1 is the right edge.
    locs.append([(1.0, (i + 0.5) / h)])
    expected.append(0.5 * v[i, -1])
    for j in range(w):
      # A pixel center returns that pixel.
      locs.append([((j + 0.5) / w, (i + 0.5) / h)])
      expected.append(v[i, j])
  # Top and bottom edges at a pixel center column.
  locs += [[(1.5 / w, 0.0)], [(1.5 / w, 1.0)]]
  expected += [0.5 * v[0, 1], 0.5 * v[-1, 1]]
  # Corner of the map: a quarter of the corner pixel.
  locs.append([(0.0, 0.0)])
  expected.append(0.25 * v[0, 0])
  # Far outside, or at least one pixel beyond an edge: exactly zero.
  for xy in [(5.0, 0.5), (-3.0, -3.0), (0.5, 7.0), (-0.25, 0.5), (1.25, 1.25), (0.5, -1 / 3)]:
    locs.append([xy])
    expected.append(np.zeros(2))
  out = _sample([v], ((h, w),), locs, impl)
  np.testing.assert_allclose(out, np.array(expected), rtol=1e-6, atol=0)


@pytest.mark.parametrize('impl', IMPLS)
def test_levels_are_addressed_by_start_index(impl):
  # Two levels, attention 1 on both: the sum of each level's pixel at its own pixel center.
  a = np.random.default_rng(5).normal(size=(2, 3, 2))
  b = np.random.default_rng(6).normal(size=(3, 2, 2))
  out = _sample([a, b], ((2, 3), (3, 2)), [[(2.5 / 3, 0.25), (0.75, 0.5)]], impl)
  np.testing.assert_allclose(out[0], a[0, 2] + b[1, 1], rtol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Transformations, dispatch and errors


@pytest.mark.parametrize('impl', IMPLS)
def test_jit_compiles_once(impl):
  traces = []

  @jax.jit
  def loss(v, lc, a):
    traces.append(1)
    return jnp.sum(ms_deform_attn(v, SHAPES, None, lc, a, impl=impl) ** 2)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  counts = []
  for seed in (7, 8, 9):
    inputs = make_inputs(seed)
    loss(*inputs)
    grad(*inputs)
    counts.append(len(traces))
  assert loss._cache_size() == 1 and grad._cache_size() == 1
  assert counts[0] >= 1 and counts[1] == counts[2] == counts[0]  # no retrace after the first call


def test_vmap_of_forward_and_custom_vjp():
  # vmap over an extra leading axis equals a loop, for the forward and for the hand-written backward.
  impl = 'xla'
  stacked = [np.stack(x) for x in zip(make_inputs(11), make_inputs(12))]
  f = lambda v, lc, a: ms_deform_attn(v, SHAPES, None, lc, a, impl=impl)
  batched = jax.jit(jax.vmap(f))(*stacked)
  for k in range(2):
    np.testing.assert_allclose(batched[k], f(*[x[k] for x in stacked]), atol=1e-6)  # f32 rounding only
  grad = jax.grad(lambda *x: jnp.sum(f(*x) ** 2), argnums=(0, 1, 2))
  gb = jax.jit(jax.vmap(grad))(*stacked)
  g0 = jax.jit(grad)(*[x[0] for x in stacked])
  for a, b in zip(gb, g0):
    np.testing.assert_allclose(a[0], b, atol=1e-5)


@pytest.mark.parametrize('impl', IMPLS)
def test_value_bias_equals_adding_it_to_the_value(impl):
  # value_bias (M, D) samples value + bias: forward and all four gradients (value, bias, locations, weights) equal
  # the op on value + bias (the bias's gradient is the value gradient summed over batch and tokens). 'xla' adds the
  # bias to the gathered rows: the same float operation per element, so its forward is compared exactly.
  value, loc, attn = make_inputs(21)
  bias = np.random.default_rng(22).normal(size=value.shape[2:]).astype(np.float32)
  cot = np.random.default_rng(23).normal(size=(*loc.shape[:2], value.shape[2] * value.shape[3])).astype(np.float32)
  with_bias = lambda v, b, lc, a: jnp.sum(ms_deform_attn(v, SHAPES, None, lc, a, impl=impl, value_bias=b) * cot)
  added = lambda v, b, lc, a: jnp.sum(ms_deform_attn(v + b, SHAPES, None, lc, a, impl=impl) * cot)
  args = (value, bias, loc, attn)
  out = jax.jit(lambda *x: ms_deform_attn(x[0], SHAPES, None, x[2], x[3], impl=impl, value_bias=x[1]))(*args)
  ref = jax.jit(lambda *x: ms_deform_attn(x[0] + x[1], SHAPES, None, x[2], x[3], impl=impl))(*args)
  if impl == 'xla':
    np.testing.assert_array_equal(out, ref)
  else:
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
  grads = jax.jit(jax.grad(with_bias, argnums=(0, 1, 2, 3)))(*args)
  expected = jax.jit(jax.grad(added, argnums=(0, 1, 2, 3)))(*args)
  for name, g, e in zip(('value', 'bias', 'loc', 'attn'), grads, expected):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5, err_msg=name)
  assert float(np.abs(grads[1]).max()) > 0.1  # the bias gets a gradient
  with pytest.raises(ValueError, match='value_bias'):
    ms_deform_attn(value, SHAPES, None, loc, attn, impl=impl, value_bias=bias[:, :-1])


def test_auto_dispatch_and_argument_checks():
  value, loc, attn = make_inputs(13)
  # On CPU, 'auto' is the dense formulation while its sampling matrix fits, and the gather one beyond.
  small = ms_deform_attn(value, SHAPES, None, loc, attn, impl='dense')
  # A numpy spatial_shapes and a consistent level_start_index are accepted.
  np_shapes = np.array(SHAPES)
  starts = np.array([0, 35, 47])
  np.testing.assert_array_equal(ms_deform_attn(value, np_shapes, starts, loc, attn, impl='auto'), small)
  n, s, m, _ = value.shape
  lq = loc.shape[1]
  assert dense_fits(n, lq, m, s)
  with mock.patch.object(dense_module, 'DENSE_MAX_ELEMENTS', n * lq * m * s - 1):
    big = ms_deform_attn(value, SHAPES, None, loc, attn, impl='auto')
  np.testing.assert_array_equal(big, ms_deform_attn(value, SHAPES, None, loc, attn, impl='xla'))
  with pytest.raises(ValueError, match='level_start_index'):
    ms_deform_attn(value, SHAPES, (0, 35, 48), loc, attn)
  with pytest.raises(ValueError, match='tokens'):
    ms_deform_attn(value[:, :-1], SHAPES, None, loc, attn)
  with pytest.raises(ValueError, match='impl'):
    ms_deform_attn(value, SHAPES, None, loc, attn, impl='cuda')
  with pytest.raises(TypeError, match='static'):
    jax.jit(lambda ss: ms_deform_attn(value, ss, None, loc, attn))(jnp.array(SHAPES))


def test_auto_dispatch_follows_the_lowering_platforms():
  # What 'auto' and 'pallas' pick inside `lowering_for` (jax.export for another platform), read from the dispatch
  # itself: a CUDA-only lowering gets the GPU choice, a CPU + CUDA lowering the formulation both run.
  from kernels import ms_deform_attn as msda

  value, loc, _ = make_inputs(13)
  assert msda.target_platforms() == (jax.default_backend(),)
  with msda.lowering_for(('cuda',)):
    assert msda.target_platforms() == ('cuda',)
    assert msda._resolve('auto', value, loc) == 'pallas'
    with mock.patch.object(msda, 'PALLAS_ON_GPU', False):
      assert msda._resolve('auto', value, loc) == 'xla'
    assert msda._on_gpu_only()
  with msda.lowering_for(('cpu', 'CUDA')):
    assert msda._resolve('auto', value, loc) == 'xla' and not msda._on_gpu_only()
    with pytest.raises(ValueError, match='cannot be lowered for'):
      msda._resolve('pallas', value, loc)
  with msda.lowering_for(('cpu',)):
    assert msda._resolve('auto', value, loc) == 'dense'
  with msda.lowering_for(None):
    assert msda.target_platforms() == (jax.default_backend(),)
  assert msda.target_platforms() == (jax.default_backend(),)


def test_value_gradient_is_chunked_for_cpus_and_one_scatter_for_gpus():
  # At the encoder size (1.4 GB of value-gradient updates) the CPU lowering runs the chunked scan
  # (xla.value_grad), a CUDA-only lowering one scatter. Lowered from abstract shapes: nothing is computed.
  from kernels import ms_deform_attn as msda

  shapes = ((128, 128), (64, 64), (32, 32), (16, 16))
  s = sum(h * w for h, w in shapes)
  args = [
    jax.ShapeDtypeStruct((1, s, 8, 32), jnp.float32),
    jax.ShapeDtypeStruct((1, s, 8, 4, 4, 2), jnp.float32),
    jax.ShapeDtypeStruct((1, s, 8, 4, 4), jnp.float32),
  ]
  grad = jax.grad(lambda v, lc, a: jnp.sum(msda.ms_deform_attn(v, shapes, None, lc, a, impl='xla')), argnums=(0, 1, 2))

  def lowered(platforms):
    jax.clear_caches()  # traces are cached regardless of `lowering_for` (see dimaskdino_jax/export.py)
    try:
      with msda.lowering_for(platforms):
        return jax.jit(grad).trace(*args).lower(lowering_platforms=platforms).as_text()
    finally:
      jax.clear_caches()

  cpu, cuda = lowered(('cpu',)), lowered(('cuda',))
  assert 'stablehlo.while' in cpu and cpu.count('"stablehlo.scatter"') == 2  # the two groups, inside the scan
  assert 'stablehlo.while' not in cuda and cuda.count('"stablehlo.scatter"') == 1


def test_matches_torch_grid_sample_when_available():
  # Independent second oracle: PyTorch's own grid_sample per level (Deformable DETR's pure-PyTorch core), with
  # its autograd for the three gradients. Both float32: agreement to ~1e-6 relative; 1e-5 allows for order.
  torch = pytest.importorskip('torch')
  from kernels.ms_deform_attn.torch_reference import ms_deform_attn_torch

  shapes = ((5, 7), (3, 4), (1, 1))
  value, loc, attn = make_inputs(21, n=2, lq=6, m=3, d=4, p=2, shapes=shapes)
  cot = np.random.default_rng(22).normal(size=(2, 6, 12)).astype(np.float32)
  tv, tl, ta = (torch.from_numpy(x).requires_grad_(True) for x in (value, loc, attn))
  tout = ms_deform_attn_torch(tv, shapes, tl, ta)
  (tout * torch.from_numpy(cot)).sum().backward()
  out, grads = _fwd_vjp('xla', shapes)(value, loc, attn, cot)
  _assert_close(out, tout.detach().numpy().astype(np.float64), 1e-5, 'out')
  for name, g, t in zip(('value', 'loc', 'attn'), grads, (tv, tl, ta)):
    _assert_close(g, t.grad.numpy().astype(np.float64), 1e-5, f'grad_{name}')


def test_pallas_triton_lowering_without_gpu():
  # Runs the Pallas -> Triton lowering (interpret=False) for the cuda platform on this CPU-only machine: catches
  # lowering errors (non-power-of-2 arrays, unsupported indexing) without a GPU. Shapes chosen so that queries
  # (20), points (3 levels x 2 = 6) and channels (5) all need padding. It does not run Triton's own compiler.
  from kernels import ms_deform_attn as msda
  from kernels.ms_deform_attn.pallas import ms_deform_attn_pallas

  value, loc, attn = make_inputs(30, n=2, lq=20, m=3, d=5, p=2)
  starts = (0, 35, 47)
  fwd = jax.jit(lambda v, lc, a: ms_deform_attn_pallas(v, SHAPES, starts, lc, a, False))
  try:
    with msda.gpu_target_without_gpu(('cuda',)):  # jax >= 0.11 without a GPU: an abstract GPU device
      lowered = fwd.trace(value, loc, attn).lower(lowering_platforms=('cuda',))
  except Exception as e:  # noqa: BLE001 - decide below whether this jaxlib can lower for cuda at all
    if 'cuda' in str(e).lower() and 'platform' in str(e).lower():
      pytest.skip(f'this jaxlib cannot lower for cuda without a GPU: {e}')
    raise
  assert lowered.as_text().count('__gpu$xla.gpu.triton') == 1
  # The gradient: the forward kernel and the backward kernel (with its atomic value gradient), nothing else.
  loss = lambda v, lc, a: jnp.sum(ms_deform_attn_pallas(v, SHAPES, starts, lc, a, False) ** 2)
  with msda.gpu_target_without_gpu(('cuda',)):
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(value, loc, attn).lower(lowering_platforms=('cuda',))
  text = text.as_text()
  assert text.count('__gpu$xla.gpu.triton') == 2
  assert 'scatter' not in text  # the value gradient is the kernel's atomics, not the pure-JAX scatter-add


def _distinct_rows_inputs(seed, n=2, m=2, d=5, shapes=((8, 8), (10, 9))):
  """One block of 16 queries, one point per level, whose 4 bilinear corners never share a row within a corner:
  query q samples near pixel (2 * (q % 4), 2 * (q // 4)) (permuted per level) with random fractions in (0, 1),
  one query a little outside the top-left corner. Pallas' interpret mode applies atomic adds exactly then."""
  rng = np.random.default_rng(seed)
  lq = 16
  loc = np.zeros((n, lq, m, len(shapes), 1, 2))
  for lvl, (h, w) in enumerate(shapes):
    for b in range(n):
      for hd in range(m):
        cell = rng.permutation(lq)
        px = 2 * (cell % 4) + rng.uniform(0.05, 0.95, lq)  # pixel coordinates, x = loc_x * W - 0.5
        py = 2 * (cell // 4) + rng.uniform(0.05, 0.95, lq)
        px[cell == 0] -= 1.0  # x0 = y0 = -1: two of the four corners are outside the map
        py[cell == 0] -= 1.0
        loc[b, :, hd, lvl, 0, 0] = (px + 0.5) / w
        loc[b, :, hd, lvl, 0, 1] = (py + 0.5) / h
  s = sum(h * w for h, w in shapes)
  value = rng.normal(size=(n, s, m, d))
  attn = rng.uniform(0.2, 1.0, size=(n, lq, m, len(shapes), 1))
  cot = rng.normal(size=(n, lq, m * d))
  return [x.astype(np.float32) for x in (value, loc, attn, cot)], shapes


def test_pallas_atomic_value_gradient_in_interpret_mode():
  # The GPU backward's atomic value gradient, run by the interpreter on inputs where it is exact (distinct corner
  # rows within each block; with shared rows interpret mode keeps one update per row, docs/jax_notes.md).
  # All three gradients against the float64 oracle, and the same value gradient as the pure-JAX scatter-add path.
  from kernels.ms_deform_attn.pallas import ms_deform_attn_pallas

  (value, loc, attn, cot), shapes = _distinct_rows_inputs(40)
  starts = (0, 64)

  def grads(atomic):
    f = lambda v, lc, a: ms_deform_attn_pallas(v, shapes, starts, lc, a, True, atomic_value_grad=atomic)
    return jax.jit(lambda v, lc, a: jax.vjp(f, v, lc, a)[1](cot))(value, loc, attn)

  atomic, scatter = grads(True), grads(False)
  expected = np_backward(value, shapes, loc, attn, cot)
  assert np.abs(expected[0]).max() > 0.5  # the value gradient is not trivially zero
  for name, g, e in zip(('value', 'loc', 'attn'), atomic, expected):
    _assert_close(g, e, 1e-5, f'grad_{name} (atomic)')
  np.testing.assert_allclose(atomic[0], scatter[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
  'n,m,queries_per_chunk',
  [
    (2, 4, 1),  # heads split in two groups, one query per chunk
    (2, 3, 4),  # odd heads: the batch split in two; 41 queries in chunks of 4 (3 padding queries)
    (1, 3, 2),  # neither splits: one group; chunks of 2 (1 padding query)
    (2, 4, None),  # one scatter of all updates (the GPU choice)
  ],
)
def test_xla_chunked_value_gradient(n, m, queries_per_chunk):
  # The CPU value gradient runs the queries in chunks (a scan) and in two groups that write disjoint rows
  # (xla.value_grad); the small cases above fit one chunk, so the chunking is forced here through chunk_bytes.
  from kernels.ms_deform_attn import xla

  d, p, lq = 3, 2, 41  # more than xla.SINGLE_SCATTER_CHUNKS chunks in every case
  value, loc, attn = make_inputs(50 + n * m, n=n, lq=lq, m=m, d=d, p=p)
  cot = np.random.default_rng(51).normal(size=(n, lq, m * d)).astype(np.float32)
  if queries_per_chunk is None:
    chunk_bytes = None
  else:  # the update bytes of one query in one group (the split halves the heads, else the batch, else nothing)
    group = (n * m // 2) if (m % 2 == 0 or n % 2 == 0) else n * m
    chunk_bytes = queries_per_chunk * group * 4 * len(SHAPES) * p * d * 4
  f = jax.jit(lambda v, lc, a: xla.ms_deform_attn_xla(v, SHAPES, (0, 35, 47), lc, a, chunk_bytes))
  grads = jax.vjp(f, value, loc, attn)[1](jnp.asarray(cot))
  expected = np_backward(value, SHAPES, loc, attn, cot)
  for name, g, e in zip(('value', 'loc', 'attn'), grads, expected):
    _assert_close(g, e, 1e-5, f'grad_{name}')
  if queries_per_chunk is not None:  # the scan really runs several chunks
    text = jax.jit(jax.grad(lambda v: jnp.sum(f(v, loc, attn)))).lower(value).as_text()
    assert 'while' in text or 'scan' in text
