"""point_sample and point_sample_no_grad vs a NumPy grid_sample(align_corners=False, zeros) sampler; PointRend
importance sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimaskdino_jax.losses import point_sampling
from dimaskdino_jax.losses.point_sampling import (
  num_uniform_draws,
  point_sample,
  point_sample_no_grad,
  point_sample_rows,
  point_sample_windows,
  uncertain_point_coords,
)
from tests.losses.helpers import np_point_sample


def _points(rng, n, p, h, w):
  pts = rng.uniform(size=(n, p, 2))
  # Edges, corners and exact pixel centers: the zero-padding and half-pixel conventions show up there.
  pts[:, :6] = [[0, 0], [1, 1], [0, 1], [1, 0], [0.5 / w, 0.5 / h], [(w - 0.5) / w, 0.25 / h]]
  return pts


SAMPLERS = pytest.mark.parametrize('sampler', [point_sample, point_sample_no_grad], ids=['point_sample', 'no_grad'])
ROW_SAMPLERS = pytest.mark.parametrize(
  'sampler',
  [point_sample, point_sample_no_grad, point_sample_windows, point_sample_rows],
  ids=['point_sample', 'no_grad', 'windows', 'rows'],
)


@ROW_SAMPLERS
def test_point_sample_matches_numpy_per_map_points(sampler):
  rng = np.random.default_rng(0)
  maps = rng.normal(size=(3, 5, 7))
  pts = _points(rng, 3, 20, 5, 7)
  out = sampler(jnp.asarray(maps, jnp.float32), jnp.asarray(pts, jnp.float32))
  ref = np.stack([np_point_sample(maps[i], pts[i]) for i in range(3)])
  assert out.shape == (3, 20)
  np.testing.assert_allclose(np.asarray(out), ref, atol=2e-6)
  # The corner (0, 0) sees a quarter of pixel (0, 0) (three taps are padding zeros).
  np.testing.assert_allclose(np.asarray(out[:, 0]), maps[:, 0, 0] / 4, atol=1e-6)
  # A pixel center returns the pixel.
  np.testing.assert_allclose(np.asarray(out[:, 4]), maps[:, 0, 0], atol=1e-6)


@SAMPLERS
def test_point_sample_shared_points_shared_map_and_uint8(sampler):
  rng = np.random.default_rng(1)
  maps = (rng.uniform(size=(4, 6, 6)) > 0.5).astype(np.uint8)
  pts = _points(rng, 1, 15, 6, 6)[0]
  shared = sampler(jnp.asarray(maps), jnp.asarray(pts, jnp.float32))  # points (P, 2) for every map
  assert shared.dtype == jnp.float32 and shared.shape == (4, 15)
  ref = np.stack([np_point_sample(maps[i].astype(np.float64), pts) for i in range(4)])
  np.testing.assert_allclose(np.asarray(shared), ref, atol=2e-6)
  many = _points(rng, 2, 9, 6, 6)
  one_map = sampler(jnp.asarray(maps[0]), jnp.asarray(many, jnp.float32))  # map (H, W) for every point set
  ref = np.stack([np_point_sample(maps[0].astype(np.float64), many[i]) for i in range(2)])
  np.testing.assert_allclose(np.asarray(one_map), ref, atol=2e-6)


def test_point_sample_rows_gradient_is_the_bilinear_scatter():
  # The maps' gradient of point_sample_rows (a custom VJP: one windowed scatter-add into the padded map) against
  # autodiff of point_sample and against NumPy: each point adds cotangent x bilinear weight to its four taps, taps
  # outside the map dropped (grid_sample's zero padding).
  rng = np.random.default_rng(5)
  n, p, h, w = 3, 40, 6, 9
  maps = rng.normal(size=(n, h, w)).astype(np.float32)
  pts = _points(rng, n, p, h, w).astype(np.float32)
  cot = rng.normal(size=(n, p)).astype(np.float32)
  out, vjp = jax.vjp(lambda m: point_sample_rows(m, jnp.asarray(pts)), jnp.asarray(maps))
  (grad,) = vjp(jnp.asarray(cot))
  ref_out, ref_vjp = jax.vjp(lambda m: point_sample(m, jnp.asarray(pts)), jnp.asarray(maps))
  (ref_grad,) = ref_vjp(jnp.asarray(cot))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), rtol=1e-6, atol=1e-6)
  expect = np.zeros((n, h, w), np.float64)
  for i in range(n):
    for (x, y), g in zip(pts[i].astype(np.float64), cot[i]):
      px, py = x * w - 0.5, y * h - 0.5
      x0, y0 = int(np.floor(px)), int(np.floor(py))
      fx, fy = px - x0, py - y0
      for dy, dx, wt in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)), (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
        if 0 <= y0 + dy < h and 0 <= x0 + dx < w:
          expect[i, y0 + dy, x0 + dx] += g * wt
  np.testing.assert_allclose(np.asarray(grad), expect, rtol=1e-5, atol=1e-5)
  # The points take no gradient.
  pts_grad = jax.grad(lambda q: point_sample_rows(jnp.asarray(maps), q).sum())(jnp.asarray(pts))
  assert np.all(np.asarray(pts_grad) == 0)


def test_uncertain_points_pick_the_uncertain_region():
  # Map 0 is uncertain (logit 0) for x < 0.5, map 1 for y >= 0.5; confident (logit 10) elsewhere.
  logits = np.full((2, 16, 16), 10.0, np.float32)
  logits[0, :, :8] = 0.0
  logits[1, 8:, :] = 0.0
  num_points, over, imp = 40, 3.0, 0.75
  sample = jax.jit(lambda l: uncertain_point_coords(l, jax.random.key(0), num_points, over, imp))
  pts = sample(jnp.asarray(logits))
  assert pts.shape == (2, num_points, 2)
  pts = np.asarray(pts)
  assert pts.min() >= 0 and pts.max() <= 1
  n_unc = int(imp * num_points)
  # About 60 of the 120 oversampled points have logit 0; the 30 most uncertain are all among them.
  assert np.all(pts[0, :n_unc, 0] < 7.5 / 16)
  assert np.all(pts[1, :n_unc, 1] > 8.5 / 16)
  # The rest are fresh uniform points, not restricted to the uncertain half.
  assert np.any(pts[0, n_unc:, 0] > 0.5) and np.any(pts[1, n_unc:, 1] < 0.5)
  # Same key, same points; no gradient through the selection.
  again = sample(jnp.asarray(logits))
  np.testing.assert_array_equal(np.asarray(again), pts)
  grad = jax.grad(lambda l: uncertain_point_coords(l, jax.random.key(0), num_points, over, imp).sum())(logits)
  assert np.all(np.asarray(grad) == 0)


def test_uncertain_points_from_given_uniforms():
  n, num_points, over, imp = 3, 8, 3.0, 0.75
  draws = num_uniform_draws(num_points, over, imp)
  assert draws == 24 + 2
  uniform = jax.random.uniform(jax.random.key(3), (n, draws, 2))
  logits = jax.random.normal(jax.random.key(4), (n, 5, 5))
  pts = jax.jit(lambda l, u: uncertain_point_coords(l, None, num_points, over, imp, uniform=u))(logits, uniform)
  # The last num_points - 6 points are the last uniform draws; the first 6 are a subset of the oversampled ones.
  np.testing.assert_array_equal(np.asarray(pts[:, 6:]), np.asarray(uniform[:, 24:]))
  for i in range(n):
    cand = {tuple(p) for p in np.asarray(uniform[i, :24])}
    assert all(tuple(p) in cand for p in np.asarray(pts[i, :6]))
    # And they are the 6 most uncertain of the 24.
    unc = -np.abs(np_point_sample(np.asarray(logits[i], np.float64), np.asarray(uniform[i, :24])))
    chosen = -np.abs(np_point_sample(np.asarray(logits[i], np.float64), np.asarray(pts[i, :6])))
    np.testing.assert_allclose(np.sort(chosen), np.sort(unc)[-6:], atol=1e-5)
  with pytest.raises(ValueError, match='uniform has shape'):
    uncertain_point_coords(logits, None, num_points, over, imp, uniform=uniform[:, :5])


def test_top_k_indices_are_the_index_set_of_lax_top_k_ties_included():
  """point_sampling.top_k_indices (a host selection on a CPU) picks lax.top_k's indices, ties broken towards the
  lower index as top_k does, under jit and vmap; PointRend's sizes and small ones."""
  rng = np.random.default_rng(0)
  for n, k, rows in ((37632, 9408, 6), (40, 7, 50), (9, 9, 3), (12, 1, 4)):
    v = -np.abs(rng.normal(size=(rows, n))).astype(np.float32)
    v[0, : n // 2] = v[0, n - 1]  # a tie across the cut
    v[1] = 0.0  # all equal: the first k
    v[2, ::2] = np.round(v[2, ::2], 1)  # many ties
    want = np.sort(np.asarray(jax.lax.top_k(jnp.asarray(v), k)[1]), axis=-1)
    got = np.asarray(jax.jit(lambda x, k=k: point_sampling.top_k_indices(x, k))(v))
    np.testing.assert_array_equal(got, want)
    batched = np.asarray(jax.vmap(lambda x, k=k: point_sampling.top_k_indices(x, k))(v.reshape(rows, 1, n)))
    np.testing.assert_array_equal(batched[:, 0], want)


def test_hashed_uniform_is_uniform_and_independent():
  from scipy import stats

  key = jax.random.key(7)
  u = np.asarray(jax.jit(lambda k: point_sampling.hashed_uniform(k, (50, 4000, 2)))(key))  # 400,000 values
  assert u.dtype == np.float32 and u.shape == (50, 4000, 2)
  assert u.min() >= 0.0 and u.max() < 1.0
  flat = u.reshape(-1)
  assert stats.kstest(flat, 'uniform').pvalue > 1e-3
  # Neighbours (x and y of one point; consecutive points) and another key's stream are uncorrelated:
  # |r| < 0.01 is ~6 standard errors at these sizes.
  other = np.asarray(point_sampling.hashed_uniform(jax.random.fold_in(key, 1), (50, 4000, 2))).reshape(-1)
  for a, b in ((u[..., 0], u[..., 1]), (flat[:-1], flat[1:]), (flat, other)):
    assert abs(np.corrcoef(a.reshape(-1), b.reshape(-1))[0, 1]) < 0.01
  # Pairs fill the unit square evenly (a 10 x 10 grid, chi-square) and the key decides the stream.
  counts = np.histogram2d(u[..., 0].reshape(-1), u[..., 1].reshape(-1), bins=10, range=[[0, 1], [0, 1]])[0]
  assert stats.chisquare(counts.reshape(-1)).pvalue > 1e-3
  again = np.asarray(point_sampling.hashed_uniform(key, (50, 4000, 2)))
  np.testing.assert_array_equal(again, u)
  assert np.mean(other == flat) < 1e-3


def test_kth_largest_is_np_partition_s_including_ties_and_missed_brackets():
  """The bracketed selection of the host top-k gives np.partition's k-th largest on random rows, rows with heavy
  ties, constant rows, extreme k and short rows (its fallbacks); a bracket forced to miss (a tiny stride's margin
  around an adversarial subsample) falls back rather than answering wrong."""
  rng = np.random.default_rng(3)
  for trial in range(120):
    n = int(rng.integers(100, 40000))
    k = int(rng.choice([1, n, int(rng.integers(1, n + 1))]))
    rows = rng.standard_normal((int(rng.integers(1, 4)), n)).astype(np.float32)
    if trial % 3 == 0:
      rows = np.round(rows * 4) / 4
    if trial % 7 == 0:
      rows[:] = 1.0
    want = np.partition(rows, n - k, axis=-1)[:, n - k]
    np.testing.assert_array_equal(point_sampling._kth_largest(rows, k), want)
  # Every subsampled value (stride 16) is the row's largest: the bracket sits far above the k-th value.
  n, k = 16000, 8000
  rows = rng.standard_normal((2, n)).astype(np.float32)
  rows[:, ::16] = 100.0
  want = np.partition(rows, n - k, axis=-1)[:, n - k]
  np.testing.assert_array_equal(point_sampling._kth_largest(rows, k), want)
