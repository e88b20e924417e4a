"""The criterion: each loss vs float64 NumPy from the definitions, DN layout, perfect predictions, jit + grad."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from dimaskdino_jax.losses import criterion, matcher
from dimaskdino_jax.losses.point_sampling import uncertain_point_coords
from dimaskdino_jax.modeling.outputs import HeadOutputs, Predictions
from tests.losses import helpers as h

BOX = ('loss_ce', 'loss_bbox', 'loss_giou')
MASK = ('loss_mask', 'loss_dice')


def expected_names(n_layers, t_layers, masks=True, deep=True, interm=True, di=True, dn=True):
  base = BOX + (MASK if masks else ())
  names = set(base)
  aux = range(n_layers - 1) if deep else range(0)
  names |= {f'{k}_{i}' for k in base for i in aux}
  if interm:
    names |= {f'{k}_interm' for k in base}
  if dn:
    names |= {f'{k}_dn' for k in base} | {f'{k}_dn_{i}' for k in base for i in aux}
  if di:
    names |= {f'oldm_{k}_{i}' for k in BOX for i in range(t_layers)}
  return names


def test_elementwise_losses_match_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(scale=4.0, size=(3, 50))
  t = (rng.uniform(size=(3, 50)) > 0.6).astype(np.float64)
  soft = rng.uniform(size=(3, 50))
  focal = criterion.sigmoid_focal_loss(jnp.asarray(x, jnp.float32), jnp.asarray(t), 0.25, 2.0)
  np.testing.assert_allclose(np.asarray(focal), h.np_focal(x, t), rtol=1e-4, atol=1e-6)
  bce = criterion.sigmoid_ce_loss(jnp.asarray(x, jnp.float32), jnp.asarray(soft, jnp.float32))
  np.testing.assert_allclose(np.asarray(bce), h.np_bce(x, soft).mean(-1), rtol=1e-5)
  dice = criterion.dice_loss(jnp.asarray(x, jnp.float32), jnp.asarray(soft, jnp.float32))
  np.testing.assert_allclose(np.asarray(dice), [h.np_dice(x[i], soft[i]) for i in range(3)], rtol=1e-5)


def test_matched_losses_and_mask_losses_match_numpy():
  cfg = h.tiny_config(num_points=16)
  targets = h.make_targets(seed=1)
  head = h.random_head(np.random.default_rng(2), (h.B,), h.Q)
  q_for_gt = np.array([[4, 0, 2], [1, -1, -1]], np.int32)  # image 1 has one GT
  got = jax.jit(lambda hd, t, q: criterion.matched_loss_sums(hd, t, q, cfg.loss))(head, targets, q_for_gt)
  assert set(got) == set(BOX)
  ref = h.np_matched_losses(head.logits, head.boxes, targets, q_for_gt)
  for k in BOX:
    np.testing.assert_allclose(float(got[k]), ref[k], rtol=1e-5, err_msg=k)
  # Mask losses at given points (pred 8x8, GT 16x16: different resolutions).
  rng = np.random.default_rng(3)
  pred = np.asarray(head.masks[0, q_for_gt[0]])
  gt = targets['masks'][0]
  pts = rng.uniform(size=(3, 40, 2))
  weights = np.array([1.0, 0.0, 1.0])
  bce, dice = jax.jit(criterion.mask_loss_sums_at_points)(pred, gt, pts, weights)
  xs = [h.np_point_sample(pred[i].astype(np.float64), pts[i]) for i in range(3)]
  ts = [h.np_point_sample(gt[i].astype(np.float64), pts[i]) for i in range(3)]
  np.testing.assert_allclose(float(bce), sum(w * h.np_bce(x, t).mean() for w, x, t in zip(weights, xs, ts)), rtol=1e-5)
  np.testing.assert_allclose(float(dice), sum(w * h.np_dice(x, t) for w, x, t in zip(weights, xs, ts)), rtol=1e-5)
  # With masks, matched_loss_sums samples importance points from the given uniforms and gets the same numbers.
  draws = criterion.num_uniform_draws(cfg.loss)
  uniform = jax.random.uniform(jax.random.key(0), (h.B, h.G, draws, 2))
  got = jax.jit(lambda hd, t, q, u: criterion.matched_loss_sums(hd, t, q, cfg.loss, u))(
    head, targets, q_for_gt, uniform
  )

  @jax.jit
  def by_hand(masks, gt_masks, uniform):
    pred_all = masks[jnp.arange(2)[:, None], jnp.maximum(q_for_gt, 0)].reshape(6, *h.PRED_HW)
    pts = uncertain_point_coords(pred_all, None, 16, 3.0, 0.75, uniform=uniform.reshape(6, draws, 2))
    return criterion.mask_loss_sums_at_points(pred_all, gt_masks.reshape(6, *h.GT_HW), pts, (q_for_gt >= 0).reshape(-1))

  bce, dice = by_hand(head.masks, targets['masks'], uniform)
  np.testing.assert_allclose(float(got['loss_mask']), float(bce), rtol=1e-6)
  np.testing.assert_allclose(float(got['loss_dice']), float(dice), rtol=1e-6)


def test_perfect_prediction_has_near_zero_box_and_mask_losses():
  cfg = h.tiny_config(num_points=512)
  cfg.loss.importance_sample_ratio = 0.0  # uniform points: the edge band gets its area share, no more
  hw = (64, 64)
  targets = h.make_targets(seed=0, counts=(3, 2), hw=hw)
  q_for_gt = np.array([[0, 5, 2], [3, 4, -1]], np.int32)
  masks = np.full((2, h.Q, *hw), -10.0, np.float32)
  boxes = np.full((2, h.Q, 4), 0.5, np.float32)
  for i in range(2):
    for j, q in enumerate(q_for_gt[i]):
      if q >= 0:
        masks[i, q] = 10.0 * (2.0 * targets['masks'][i, j] - 1.0)
        boxes[i, q] = targets['boxes'][i, j]
  uniform = jax.random.uniform(jax.random.key(0), (2, h.G, criterion.num_uniform_draws(cfg.loss), 2))

  def losses(m):
    head = HeadOutputs(jnp.zeros((2, h.Q, h.C)), jnp.asarray(boxes), jnp.asarray(m))
    out = criterion.matched_loss_sums(head, targets, jnp.asarray(q_for_gt), cfg.loss, uniform)
    return {k: float(v) / 5 for k, v in out.items()}  # / num_masks

  perfect = losses(masks)
  assert perfect['loss_bbox'] < 1e-6 and perfect['loss_giou'] < 1e-6
  # Bilinear sampling blends the two sides of a mask edge (GT and logits alike), so points within a pixel of an
  # edge keep a small irreducible loss; everywhere else the loss is ~softplus(-10) = 4.5e-5.
  assert perfect['loss_mask'] < 0.05 and perfect['loss_dice'] < 0.06, perfect
  wrong = losses(-masks)
  assert wrong['loss_mask'] > 5 and wrong['loss_dice'] > 0.9, wrong


@pytest.mark.parametrize(
  'num_groups,single_pad,counts,num_slots',
  [(2, 3, (3, 1), 8), (3, 2, (2, 0), 7), (1, 4, (4, 2), 4), (0, 3, (3, 1), 6)],
)
def test_dn_assignment_layout(num_groups, single_pad, counts, num_slots):
  targets = h.make_targets(seed=5, counts=counts, g=max(counts) + 1)
  info = h.make_dn_info(num_groups, single_pad, counts, num_slots)
  class_targets, class_weight, gt_index, positive = criterion.dn_assignment(info, targets, h.C)
  # The official exc_idx: output slot g * single_pad + t <-> GT t, for g < num_groups and t < n.
  for b, n in enumerate(counts):
    pairs = {(g * single_pad + t, t) for g in range(num_groups) for t in range(n)}
    got = {(s, int(gt_index[b, s])) for s in range(num_slots) if positive[b, s]}
    assert got == pairs
    for s in range(num_slots):
      active = s < num_groups * single_pad
      assert class_weight[b, s] == float(active)
      expected = np.zeros(h.C)
      if positive[b, s]:
        expected[targets['labels'][b, int(gt_index[b, s])]] = 1
      np.testing.assert_array_equal(np.asarray(class_targets[b, s]), expected)


@pytest.mark.parametrize('counts,num_slots', [((3, 1), 8), ((2, 0), 7), ((4, 4), 4), ((0, 0), 6), ((5, 2), 4)])
def test_dn_assignment_with_the_model_layout(counts, num_slots):
  """The same check on the layout the model builds (modeling.denoising.dn_layout): groups = S // max_gt."""
  from dimaskdino_jax.modeling.denoising import dn_layout

  targets = h.make_targets(seed=6, counts=counts, g=5)
  info, _ = dn_layout(jnp.asarray(targets['valid']), num_slots)
  max_gt = max(counts)
  groups = num_slots // max_gt if 0 < max_gt <= num_slots else 0
  assert int(info.num_groups) == groups
  _, class_weight, gt_index, positive = criterion.dn_assignment(info, targets, h.C)
  for b, n in enumerate(counts):
    pairs = {(g * max_gt + t, t) for g in range(groups) for t in range(n)}
    assert {(s, int(gt_index[b, s])) for s in range(num_slots) if positive[b, s]} == pairs
    np.testing.assert_array_equal(np.asarray(class_weight[b]), np.arange(num_slots) < groups * max_gt)


def _float_heads(p):
  return {'layers': p.layers, 'interm': p.interm, 'di_aux': p.di_aux, 'dn': p.dn}


def test_compute_losses_jit_grad_one_host_call(monkeypatch):
  cfg = h.tiny_config(num_points=16)
  cfg.loss.detection_weight_scale = 0.1
  targets = {k: jnp.asarray(v) for k, v in h.make_targets(seed=6).items()}
  p = h.make_predictions(seed=7, num_groups=2)
  calls = []
  solve = matcher._solve_host
  monkeypatch.setattr(matcher, '_solve_host', lambda *a, **k: calls.append(1) or solve(*a, **k))

  def loss(heads, info, rng):
    pred = Predictions(**heads, dn_info=info)
    return criterion.compute_losses(pred, targets, rng, cfg)

  step = jax.jit(jax.value_and_grad(loss, has_aux=True))
  (total, terms), grads = step(_float_heads(p), p.dn_info, jax.random.key(0))
  assert len(calls) == 1  # every matching of the step (final, 2 aux, interm, 2 DI aux) in one host call
  assert set(terms) == expected_names(h.N_LAYERS, h.T)
  assert len(terms) == 5 + 2 * 5 + 5 + 3 * 5 + 2 * 3
  values = {k: float(v) for k, v in terms.items()}
  assert all(np.isfinite(v) and v > 0 for v in values.values()), values
  w = criterion.loss_weights(cfg.loss)
  assert w['loss_ce'] == pytest.approx(0.4) and w['loss_bbox'] == pytest.approx(0.5) and w['loss_mask'] == 5.0
  expected_total = sum(
    w[next(b for b in BOX + MASK if k.removeprefix('oldm_').startswith(b))] * v for k, v in values.items()
  )
  np.testing.assert_allclose(float(total), expected_total, rtol=1e-5)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(np.asarray(g))), path
    assert float(jnp.abs(g).sum()) > 0, path

  # DN skipped this step (num_groups 0, no active slot): same compiled step, DN terms present and zero.
  info0 = h.make_dn_info(0, 3, (3, 1), h.Q)
  (_, terms0), grads0 = step(_float_heads(p), info0, jax.random.key(0))
  assert len(calls) == 2
  assert set(terms0) == set(terms)
  for k, v in terms0.items():
    assert ('_dn' in k) == (float(v) == 0.0), k
  assert float(jnp.abs(grads0['dn'].logits).sum()) == 0.0


@pytest.mark.parametrize('alpha', [0.25, 0.75])  # the official focal alpha, and configs/shapes.py's
def test_compute_losses_matches_numpy_without_masks(alpha):
  """Masks off: matching costs are deterministic, so scipy + NumPy reproduce every class / box term; `loss.focal_alpha`
  is the class loss's and the matcher's class cost's."""
  cfg = h.tiny_config()
  cfg.loss.mask_losses = False
  cfg.loss.focal_alpha = alpha
  counts = (3, 1)
  targets = h.make_targets(seed=8, counts=counts)
  p = h.make_predictions(seed=9, counts=counts, num_groups=2, with_masks=False, di_more=1)
  fn = jax.jit(lambda p, t, r, nm: criterion.compute_losses(p, t, r, cfg, num_masks_override=nm))
  total, terms = fn(p, targets, jax.random.key(1), None)
  # The later DI stage (a third selection) continues the oldm index: oldm_*_{T..2T-1}.
  assert set(terms) == expected_names(h.N_LAYERS, 2 * h.T, masks=False)
  num_masks = float(sum(counts))

  def np_set(logits, boxes):
    q_for_gt = np.full((h.B, h.G), -1)
    for i in range(h.B):
      n = counts[i]
      gt = (targets['labels'][i, :n], targets['boxes'][i, :n])
      cost = h.np_match_cost(logits[i], boxes[i], *gt, cfg.matcher, alpha=alpha)
      rows, cols = scipy.optimize.linear_sum_assignment(cost)
      q_for_gt[i, cols] = rows
    return {k: v / num_masks for k, v in h.np_matched_losses(logits, boxes, targets, q_for_gt, alpha=alpha).items()}

  lay = p.layers
  refs = {'': np_set(lay.logits[-1], lay.boxes[-1]), '_interm': np_set(p.interm.logits, p.interm.boxes)}
  for i in range(h.N_LAYERS - 1):
    refs[f'_{i}'] = np_set(lay.logits[i], lay.boxes[i])
  for i in range(h.T):
    refs[f'oldm_{i}'] = np_set(p.di_aux.logits[i], p.di_aux.boxes[i])
    refs[f'oldm_{h.T + i}'] = np_set(p.di_aux_more[0].logits[i], p.di_aux_more[0].boxes[i])
  for i, suffix in [(h.N_LAYERS - 1, '_dn'), *[(i, f'_dn_{i}') for i in range(h.N_LAYERS - 1)]]:
    refs[suffix] = h.np_dn_losses(p.dn.logits[i], p.dn.boxes[i], targets, 2, max(counts), num_masks, alpha=alpha)
  for suffix, ref in refs.items():
    for k, v in ref.items():
      name = f'oldm_{k}_{suffix[5:]}' if suffix.startswith('oldm_') else k + suffix
      np.testing.assert_allclose(float(terms[name]), v, rtol=2e-5, atol=1e-7, err_msg=name)

  # The cross-device hook: a larger normalizer scales every term down; <1 clamps to 1.
  _, terms2 = fn(p, targets, jax.random.key(1), jnp.float32(2 * num_masks))
  for k in terms:
    np.testing.assert_allclose(float(terms2[k]), float(terms[k]) / 2, rtol=1e-5, err_msg=k)
  _, terms3 = fn(p, targets, jax.random.key(1), jnp.float32(0.25))
  np.testing.assert_allclose(float(terms3['loss_bbox']), float(terms['loss_bbox']) * num_masks, rtol=1e-5)


def test_switches_remove_terms():
  cfg = h.tiny_config(num_points=8)
  cfg.loss.deep_supervision = False
  cfg.loss.interm_losses = False
  cfg.loss.di_aux_losses = False
  targets = h.make_targets(seed=10)
  p = h.make_predictions(seed=11)
  # Names only: tracing (eval_shape) is enough and compiles nothing.
  _, terms = jax.eval_shape(lambda p, t: criterion.compute_losses(p, t, jax.random.key(0), cfg), p, targets)
  assert set(terms) == expected_names(h.N_LAYERS, h.T, deep=False, interm=False, di=False)
  no_dn = p.replace(dn=None, dn_info=None)
  cfg.loss.mask_losses = False
  no_mask_targets = {k: v for k, v in targets.items() if k != 'masks'}
  _, terms = jax.eval_shape(lambda p, t: criterion.compute_losses(p, t, jax.random.key(0), cfg), no_dn, no_mask_targets)
  assert set(terms) == set(BOX)
  cfg.loss.deep_supervision = True
  cfg.loss.di_aux_losses = True
  _, terms = jax.eval_shape(lambda p, t: criterion.compute_losses(p, t, jax.random.key(0), cfg), no_dn, no_mask_targets)
  assert set(terms) == expected_names(h.N_LAYERS, h.T, masks=False, interm=False, dn=False)
  cfg.loss.mask_losses = True
  no_masks = no_dn.replace(layers=no_dn.layers.replace(masks=None))
  with pytest.raises(ValueError, match='mask_losses'):
    criterion.compute_losses(no_masks, targets, jax.random.key(0), cfg)


def _pixel_centers_np(hw):
  ys, xs = np.meshgrid((np.arange(hw[0]) + 0.5) / hw[0], (np.arange(hw[1]) + 0.5) / hw[1], indexing='ij')
  return np.stack([xs.ravel(), ys.ravel()], -1)


def test_dense_mask_losses_are_the_point_losses_at_every_pixel_center():
  """loss.num_points = 0: BCE and dice over every pixel of the predicted map, GT (finer) sampled at its centres."""
  cfg = h.tiny_config(num_points=0)
  targets = h.make_targets(seed=1)
  head = h.random_head(np.random.default_rng(2), (h.B,), h.Q)
  q_for_gt = np.array([[4, 0, 2], [1, -1, -1]], np.int32)
  t = dict(targets, mask_points=criterion.gt_at_pixel_centers(targets['masks'], *h.PRED_HW))
  got = jax.jit(lambda hd, t, q: criterion.matched_loss_sums(hd, t, q, cfg.loss, criterion.DENSE))(head, t, q_for_gt)
  pts = _pixel_centers_np(h.PRED_HW)
  bce = dice = 0.0
  for i in range(h.B):
    for j, q in enumerate(q_for_gt[i]):
      if q >= 0:
        x = np.asarray(head.masks[i, q], np.float64).ravel()  # the map itself: sampling at centres is exact
        lab = h.np_point_sample(targets['masks'][i, j].astype(np.float64), pts)
        bce += h.np_bce(x, lab).mean()
        dice += h.np_dice(x, lab)
  np.testing.assert_allclose(float(got['loss_mask']), bce, rtol=1e-5)
  np.testing.assert_allclose(float(got['loss_dice']), dice, rtol=1e-5)
  ref = h.np_matched_losses(head.logits, head.boxes, targets, q_for_gt)
  for k in BOX:
    np.testing.assert_allclose(float(got[k]), ref[k], rtol=1e-5, err_msg=k)


def test_dense_mask_costs_and_losses_through_compute_losses():
  """num_points = 0 for both the matcher and the losses: same term names, the matcher costs equal the NumPy costs
  at the pixel centres, and the loss differs from the point-sampled one (different points) but stays close."""
  preds = h.make_predictions(seed=0)
  targets = h.make_targets(seed=0)
  head = h.random_head(np.random.default_rng(3), (h.B,), h.Q)
  cfg = h.tiny_config(num_points=0)
  gt_points = criterion.gt_at_pixel_centers(targets['masks'], *h.PRED_HW)
  costs = jax.jit(lambda hd, t, g: matcher.matching_costs(hd, t, cfg.matcher, gt_points=g))(head, targets, gt_points)
  pts = _pixel_centers_np(h.PRED_HW)
  for i in range(h.B):
    n = int(targets['valid'][i].sum())
    args = (head.logits[i], head.boxes[i], targets['labels'][i, :n], targets['boxes'][i, :n].astype(np.float64))
    ref = h.np_match_cost(*args, cfg.matcher, head.masks[i], targets['masks'][i, :n], pts)
    np.testing.assert_allclose(np.asarray(costs[i, :, :n]), ref, rtol=1e-5, atol=1e-5)
  dense_total, dense_terms = jax.jit(lambda p, t: criterion.compute_losses(p, t, jax.random.key(0), cfg))(
    preds, targets
  )
  sampled_cfg = h.tiny_config(num_points=64)
  _, sampled_terms = jax.jit(lambda p, t: criterion.compute_losses(p, t, jax.random.key(0), sampled_cfg))(
    preds, targets
  )
  assert set(dense_terms) == set(sampled_terms)
  assert np.isfinite(float(dense_total))
  assert all(np.isfinite(float(v)) for v in dense_terms.values())
  for k in ('loss_dice', 'loss_dice_dn', 'loss_dice_interm'):
    assert abs(float(dense_terms[k]) - float(sampled_terms[k])) < 0.25 * float(sampled_terms[k]), k
