"""Matching costs vs a NumPy implementation of the costs (docs/architecture.md, "Losses"); the host Hungarian
solve vs scipy's optimum."""

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from dimaskdino_jax.losses import matcher
from dimaskdino_jax.modeling.outputs import HeadOutputs
from tests.losses import helpers as h


def _check_assignment(cost, valid, query_for_gt, num_queries):
  """query_for_gt is a valid assignment of minimal total cost over the valid GT columns."""
  query_for_gt = np.asarray(query_for_gt)
  cols = np.flatnonzero(valid)
  assert np.all(query_for_gt[~valid] == -1)
  matched = query_for_gt[cols] >= 0
  assert matched.sum() == min(len(cols), num_queries)
  q = query_for_gt[cols][matched]
  assert np.all(q < num_queries) and len(set(q.tolist())) == len(q)
  total = cost[q, cols[matched]].sum()
  if len(cols):
    rows, picked = scipy.optimize.linear_sum_assignment(cost[:num_queries][:, cols])
    np.testing.assert_allclose(total, cost[rows, cols[picked]].sum(), rtol=1e-6, atol=1e-6)


def test_hungarian_match_is_optimal_with_padded_gt_and_mixed_sizes():
  rng = np.random.default_rng(0)
  b, g = 3, 5
  valid = np.zeros((b, g), bool)
  valid[0, :5] = True  # full
  valid[1, :2] = True  # padded
  # image 2 has no GT
  costs = [
    rng.normal(size=(2, b, 7, g)).astype(np.float32),  # stacked sets (e.g. aux layers)
    rng.normal(size=(b, 3, g)).astype(np.float32),  # fewer queries than GT in image 0
    rng.uniform(size=(b, 9, g)).astype(np.float32),
  ]
  for c in costs:
    np.copyto(c, np.float32(-1e3), where=~valid[:, None, :])  # attractive garbage in padded columns: ignored
  out = jax.jit(matcher.hungarian_match)([jnp.asarray(c) for c in costs], jnp.asarray(valid))
  assert [o.shape for o in out] == [(2, b, g), (b, g), (b, g)]
  assert all(o.dtype == jnp.int32 for o in out)
  for c, o in zip(costs, out):
    c2 = c.reshape(-1, b, *c.shape[-2:])
    o2 = np.asarray(o).reshape(-1, b, g)
    for m in range(c2.shape[0]):
      for i in range(b):
        _check_assignment(c2[m, i].astype(np.float64), valid[i], o2[m, i], c.shape[-2])
  assert np.all(np.asarray(out[0])[:, 2] == -1) and np.all(np.asarray(out[2])[2] == -1)


def test_hungarian_match_under_vmap_and_with_nan():
  rng = np.random.default_rng(1)
  valid = np.array([[True, True, False], [True, False, False]])
  costs = rng.normal(size=(4, 2, 5, 3)).astype(np.float32)
  costs[0, 0, 1, 0] = np.nan  # a diverged prediction must not crash the host solver
  batched = jax.jit(jax.vmap(lambda c: matcher.hungarian_match([c], jnp.asarray(valid))[0]))(jnp.asarray(costs))
  assert batched.shape == (4, 2, 3)
  for v in range(4):
    single = matcher.hungarian_match([jnp.asarray(costs[v])], jnp.asarray(valid))[0]
    np.testing.assert_array_equal(np.asarray(batched[v]), np.asarray(single))
    if v:
      for i in range(2):
        _check_assignment(costs[v, i].astype(np.float64), valid[i], batched[v, i], 5)
  assert np.asarray(batched[0, 0, 0]) != 1  # the NaN pair is treated as a very bad pair


def test_matching_costs_match_numpy():
  cfg = h.tiny_config(num_points=24)
  targets = h.make_targets(seed=2)
  head = h.random_head(np.random.default_rng(3), (h.B,), h.Q)
  points = jax.random.uniform(jax.random.key(0), (h.B, 24, 2))
  with_masks = jax.jit(lambda hd, t, pt: matcher.matching_costs(hd, t, cfg.matcher, points=pt))(head, targets, points)
  no_masks = jax.jit(lambda hd, t: matcher.matching_costs(hd, t, cfg.matcher))(head, targets)
  assert with_masks.shape == (h.B, h.Q, h.G) and with_masks.dtype == jnp.float32
  for i in range(h.B):
    n = int(targets['valid'][i].sum())
    args = (head.logits[i], head.boxes[i], targets['labels'][i, :n], targets['boxes'][i, :n].astype(np.float64))
    ref = h.np_match_cost(*args, cfg.matcher, head.masks[i], targets['masks'][i, :n], np.asarray(points[i]))
    np.testing.assert_allclose(np.asarray(with_masks[i, :, :n]), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
      np.asarray(no_masks[i, :, :n]), h.np_match_cost(*args, cfg.matcher), rtol=1e-5, atol=1e-5
    )
    assert np.all(np.asarray(with_masks[i, :, n:]) == matcher.PAD_COST)


def test_matching_recovers_a_permutation():
  cfg = h.tiny_config(num_points=64)
  targets = h.make_targets(seed=4, counts=(3, 2))
  perm = np.array([[4, 0, 2], [5, 1, -1]])
  rng = np.random.default_rng(5)
  logits = np.full((2, h.Q, h.C), -6.0, np.float32)
  boxes = np.tile(np.array([0.9, 0.9, 0.05, 0.05], np.float32), (2, h.Q, 1))
  masks = np.full((2, h.Q, *h.GT_HW), -10.0, np.float32)
  for i in range(2):
    for j, q in enumerate(perm[i]):
      if q < 0:
        continue
      logits[i, q, targets['labels'][i, j]] = 6.0
      boxes[i, q] = targets['boxes'][i, j] + rng.normal(scale=0.01, size=4)
      masks[i, q] = 10.0 * (2.0 * targets['masks'][i, j] - 1.0)
  head = HeadOutputs(jnp.asarray(logits), jnp.asarray(boxes), jnp.asarray(masks))
  points = jax.random.uniform(jax.random.key(1), (2, 64, 2))

  @jax.jit
  def match(head, targets, points):
    costs = matcher.matching_costs(head, targets, cfg.matcher, points=points)
    return matcher.hungarian_match([costs], targets['valid'])[0]

  out = match(head, targets, points)
  np.testing.assert_array_equal(np.asarray(out), perm)


def test_gt_for_queries_inverts():
  q_for_gt = jnp.array([[[4, 0, 2], [1, -1, -1]]])
  out = matcher.gt_for_queries(q_for_gt, 6)
  np.testing.assert_array_equal(np.asarray(out), [[[1, -1, 2, -1, 0, -1], [-1, 0, -1, -1, -1, -1]]])
