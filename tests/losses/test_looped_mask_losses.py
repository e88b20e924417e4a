"""The looped point-sampled mask losses (criterion.looped_mask_loss_sums) against the vmapped formulation
(criterion.mask_loss_sums, all sets at once) and float64 NumPy at the same points, values and gradients, and their
wiring into compute_losses (which set / layer / DN slot gets which term)."""

import jax
import jax.numpy as jnp
import numpy as np

from dimaskdino_jax.losses import criterion, matcher
from dimaskdino_jax.losses.point_sampling import uncertain_point_coords
from dimaskdino_jax.modeling.outputs import MaskFactors, Predictions, mask_logits
from tests.losses import helpers as h

L = 3  # stacked sets (layers)
S = 5  # DN-like slots with an explicit GT index


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  targets = h.make_targets(seed=seed)
  masks = jnp.asarray(rng.normal(scale=3.0, size=(L, h.B, h.Q, *h.PRED_HW)), jnp.float32)
  query_for_gt = rng.integers(0, h.Q, (L, h.B, h.G)).astype(np.int32)
  query_for_gt[:, 1, 1:] = -1  # image 1 has one GT: its other pairs are padding (weight 0)
  dn_masks = jnp.asarray(rng.normal(scale=3.0, size=(L, h.B, S, *h.PRED_HW)), jnp.float32)
  dn_gt = rng.integers(0, h.G, (L, h.B, S)).astype(np.int32)
  dn_weight = (rng.uniform(size=(L, h.B, S)) > 0.3).astype(np.float32)
  return targets, masks, query_for_gt, dn_masks, dn_gt, dn_weight


def _looped(masks, dn_masks, query_for_gt, dn_gt, dn_weight, gt_masks, key, loss_cfg):
  pairs = [
    criterion.MaskPairs(masks, jnp.maximum(query_for_gt, 0), None, (query_for_gt >= 0).astype(jnp.float32)),
    criterion.MaskPairs(dn_masks, None, dn_gt, dn_weight),
  ]
  return criterion.looped_mask_loss_sums(pairs, gt_masks, key, loss_cfg)


def _vmapped(masks, dn_masks, query_for_gt, dn_gt, dn_weight, gt_masks, key, loss_cfg):
  """The former formulation: every set's uniforms drawn up front, one vmapped `mask_loss_sums` over all sets."""
  n1, n2 = h.B * h.G, h.B * S
  u = jnp.stack([criterion.loss_point_uniforms(key, i, n1 + n2, loss_cfg) for i in range(L)])
  u1 = u[:, :n1].reshape(L, h.B, h.G, *u.shape[-2:])
  u2 = u[:, n1:].reshape(L, h.B, S, *u.shape[-2:])
  pred = jnp.take_along_axis(masks, jnp.maximum(query_for_gt, 0)[..., None, None], axis=2)
  gt_dn = jax.vmap(lambda g: jnp.take_along_axis(gt_masks, g[..., None, None], axis=1))(dn_gt)
  gt_all = jnp.broadcast_to(gt_masks, (L, *gt_masks.shape))
  fn = jax.vmap(lambda p, g, w, uu: criterion.mask_loss_sums(p, g, w, uu, loss_cfg))
  return [fn(pred, gt_all, query_for_gt >= 0, u1), fn(dn_masks, gt_dn, dn_weight, u2)], (pred, gt_dn, u1, u2)


def test_looped_mask_losses_equal_the_vmapped_formulation_and_numpy():
  cfg = h.tiny_config(num_points=16)
  targets, masks, q, dn_masks, dn_gt, dn_w = _problem()
  gt = jnp.asarray(targets['masks'])
  key = jax.random.key(5)
  args = (q, dn_gt, dn_w, gt, key, cfg.loss)
  looped = jax.jit(lambda m, d: _looped(m, d, *args))(masks, dn_masks)
  (vmapped, (pred, gt_dn, u1, u2)) = jax.jit(lambda m, d: _vmapped(m, d, *args))(masks, dn_masks)
  for (lb, ld), (vb, vd) in zip(looped, vmapped):
    assert lb.shape == (L,) and ld.shape == (L,)
    np.testing.assert_allclose(np.asarray(lb), np.asarray(vb), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(ld), np.asarray(vd), rtol=1e-6)

  # float64 NumPy at the same importance-sampled points (the point selection itself is tested in
  # test_point_sampling.py); the sets differ, so a mix-up of sets, layers or uniforms shows.
  def np_sums(pred_maps, gt_maps, weights, uniform):
    pred_maps = np.asarray(pred_maps).reshape(-1, *h.PRED_HW)
    gt_maps = np.asarray(gt_maps).reshape(-1, *h.GT_HW)
    pts = np.asarray(uncertain_point_coords(pred_maps, None, 16, 3.0, 0.75, uniform=uniform.reshape(-1, 52, 2)))
    bce = dice = 0.0
    for p, g, w, pt in zip(pred_maps, gt_maps, np.asarray(weights).reshape(-1), pts):
      x, t = h.np_point_sample(p.astype(np.float64), pt), h.np_point_sample(g.astype(np.float64), pt)
      bce += w * h.np_bce(x, t).mean()
      dice += w * h.np_dice(x, t)
    return bce, dice

  assert criterion.num_uniform_draws(cfg.loss) == 52
  for i in range(L):
    bce, dice = np_sums(pred[i], targets['masks'], q[i] >= 0, u1[i])
    np.testing.assert_allclose(float(looped[0][0][i]), bce, rtol=1e-5)
    np.testing.assert_allclose(float(looped[0][1][i]), dice, rtol=1e-5)
    bce, dice = np_sums(dn_masks[i], gt_dn[i], dn_w[i], u2[i])
    np.testing.assert_allclose(float(looped[1][0][i]), bce, rtol=1e-5)
    np.testing.assert_allclose(float(looped[1][1][i]), dice, rtol=1e-5)

  # Gradients through the rematerialized loop body equal the vmapped formulation's.
  def total(fn):
    def f(m, d):
      sums = fn(m, d, *args)
      sums = sums[0] if fn is _vmapped else sums
      return sum(jnp.sum(b * (1 + jnp.arange(L))) + 2 * jnp.sum(dc) for b, dc in sums)

    return jax.jit(jax.grad(f, argnums=(0, 1)))

  for got, want in zip(total(_looped)(masks, dn_masks), total(_vmapped)(masks, dn_masks)):
    assert float(jnp.abs(want).sum()) > 0
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)


def test_the_backward_keeps_the_selected_points_unless_told_to_recompute_them():
  # loss.recompute_points = False (default): the loop keeps the selected points for the backward, so the gradient
  # program has the forward's selections only (one per MaskPairs, 2 here); True: the backward selects them again
  # (twice as many). The same points either way, so the same losses and gradients, up to float32 rounding: the GT
  # labels at the points (point_sample_no_grad) are computed in another fusion of the program in each case (a
  # different point would move the gradient at that pixel by ~1/16 of its size, far above the tolerance).
  targets, masks, q, dn_masks, dn_gt, dn_w = _problem()
  gt = jnp.asarray(targets['masks'])
  results = {}
  for recompute in (False, True):
    cfg = h.tiny_config(num_points=16)
    cfg.loss.recompute_points = recompute

    def f(m, d, cfg=cfg):
      sums = _looped(m, d, q, dn_gt, dn_w, gt, jax.random.key(5), cfg.loss)
      return sum(jnp.sum(b * (1 + jnp.arange(L))) + 2 * jnp.sum(dc) for b, dc in sums)

    grad = jax.value_and_grad(f, argnums=(0, 1))
    # Each selection is one host callback on a CPU (point_sampling.top_k_indices).
    assert str(jax.make_jaxpr(grad)(masks, dn_masks)).count('pure_callback') == (4 if recompute else 2)
    results[recompute] = jax.jit(grad)(masks, dn_masks)
  for kept, again in zip(jax.tree.leaves(results[False]), jax.tree.leaves(results[True])):
    np.testing.assert_allclose(np.asarray(kept), np.asarray(again), rtol=1e-5, atol=1e-7)


def test_looped_mask_losses_reject_mixed_stack_sizes():
  cfg = h.tiny_config(num_points=16)
  targets, masks, q, dn_masks, dn_gt, dn_w = _problem()
  pairs = [
    criterion.MaskPairs(masks, jnp.maximum(q, 0), None, jnp.ones(q.shape)),
    criterion.MaskPairs(dn_masks[:1], None, dn_gt[:1], dn_w[:1]),
  ]
  try:
    criterion.looped_mask_loss_sums(pairs, targets['masks'], jax.random.key(0), cfg.loss)
  except ValueError as e:
    assert 'leading size' in str(e)
  else:
    raise AssertionError('mixed leading sizes were accepted')


def test_compute_losses_mask_terms_are_the_looped_losses_of_each_set(monkeypatch):
  """Every point-sampled mask term of compute_losses: the set's matched pairs (as the host matching returned them),
  the layer's uniforms from the documented keys, normalized like the other terms."""
  cfg = h.tiny_config(num_points=16)
  counts = (3, 1)
  targets = {k: jnp.asarray(v) for k, v in h.make_targets(seed=2, counts=counts).items()}
  p = h.make_predictions(seed=3, counts=counts, num_groups=2)
  solved = []
  solve = matcher._solve_host
  monkeypatch.setattr(matcher, '_solve_host', lambda *a, **k: solved.append(solve(*a, **k)) or solved[-1])
  rng = jax.random.key(4)
  _, terms = jax.jit(lambda p, t, r: criterion.compute_losses(p, t, r, cfg))(p, targets, rng)
  (matched,) = solved  # (M, B, G): final, aux 0..N-2, interm, DI aux 0..T-1
  n = h.N_LAYERS
  final_q, aux_q, interm_q = matched[0], matched[1:n], matched[n]
  num_masks = float(sum(counts))

  k_loss = jax.random.split(rng)[1]  # compute_losses: rng, k_loss = split(rng); loop i draws with fold_in(k_loss, i)
  k_layers, k_interm = jax.random.fold_in(k_loss, 0), jax.random.fold_in(k_loss, 1)
  gt = targets['masks']
  _, _, gt_index, positive = criterion.dn_assignment(p.dn_info, targets, h.C)
  layer_q = np.concatenate([aux_q, final_q[None]])  # loop step l = layer l
  n_pairs = h.B * h.G

  def vmapped_set(masks, q, weights, uniform):
    pred = jnp.take_along_axis(masks, jnp.maximum(q, 0)[..., None, None], axis=1)
    return criterion.mask_loss_sums(pred, gt, weights, uniform.reshape(h.B, -1, *uniform.shape[-2:]), cfg.loss)

  gt_dn = jnp.take_along_axis(gt, gt_index[..., None, None], axis=1)
  for layer in range(n):
    u = criterion.loss_point_uniforms(k_layers, layer, n_pairs + h.B * h.Q, cfg.loss)
    bce, dice = vmapped_set(p.layers.masks[layer], layer_q[layer], layer_q[layer] >= 0, u[:n_pairs])
    suffix = '' if layer == n - 1 else f'_{layer}'
    np.testing.assert_allclose(float(terms['loss_mask' + suffix]), float(bce) / num_masks, rtol=1e-6)
    np.testing.assert_allclose(float(terms['loss_dice' + suffix]), float(dice) / num_masks, rtol=1e-6)
    u_dn = u[n_pairs:].reshape(h.B, h.Q, *u.shape[-2:])
    bce, dice = criterion.mask_loss_sums(p.dn.masks[layer], gt_dn, positive, u_dn, cfg.loss)
    suffix = '_dn' if layer == n - 1 else f'_dn_{layer}'
    np.testing.assert_allclose(float(terms['loss_mask' + suffix]), float(bce) / (2 * num_masks), rtol=1e-6)
    np.testing.assert_allclose(float(terms['loss_dice' + suffix]), float(dice) / (2 * num_masks), rtol=1e-6)
  u = criterion.loss_point_uniforms(k_interm, 0, n_pairs, cfg.loss)
  bce, dice = vmapped_set(p.interm.masks, interm_q, interm_q >= 0, u)
  np.testing.assert_allclose(float(terms['loss_mask_interm']), float(bce) / num_masks, rtol=1e-6)
  np.testing.assert_allclose(float(terms['loss_dice_interm']), float(dice) / num_masks, rtol=1e-6)


def test_looped_mask_losses_without_deep_supervision_or_dn():
  """Without deep supervision, final, DN (last layer) and interm are one loop of one step; without DN two sets."""
  cfg = h.tiny_config(num_points=16)
  cfg.loss.deep_supervision = False
  targets = {k: jnp.asarray(v) for k, v in h.make_targets(seed=2).items()}
  p = h.make_predictions(seed=3, num_groups=2)
  fn = jax.jit(lambda p, t: criterion.compute_losses(p, t, jax.random.key(0), cfg))
  _, terms = fn(p, targets)
  names = {k for k in terms if k.startswith(('loss_mask', 'loss_dice'))}
  assert names == {f'{k}{s}' for k in ('loss_mask', 'loss_dice') for s in ('', '_dn', '_interm')}
  assert all(np.isfinite(float(terms[k])) and float(terms[k]) > 0 for k in names)
  _, terms_no_dn = fn(Predictions(p.layers, p.interm, p.di_aux), targets)
  assert {k for k in terms_no_dn if k.startswith('loss_mask')} == {'loss_mask', 'loss_mask_interm'}


def _factored_predictions(seed=3, d=5, feature_index=(0, 0, 1)):
  """Random Predictions whose masks are products of MaskFactors (as the model's in training), with the factors."""
  rng = np.random.default_rng(seed)
  p = h.make_predictions(seed=seed, num_groups=2)
  s = p.dn.logits.shape[-2]
  embeds = jnp.asarray(rng.normal(size=(h.N_LAYERS, h.B, s + h.Q, d)), jnp.float32)
  interm_embeds = jnp.asarray(rng.normal(size=(h.B, h.K, d)), jnp.float32)
  features = jnp.asarray(rng.normal(size=(2, h.B, *h.PRED_HW, d)), jnp.float32)
  return p, MaskFactors(embeds, interm_embeds, features, feature_index, s)


def _with_dense_masks(p, factors, keep_factors):
  """p with the dense masks formed from `factors` (stack entry l uses features[feature_index[l]]), and the
  factors attached when keep_factors."""
  dense = jnp.stack([mask_logits(factors.embeds[l], factors.features[i]) for l, i in enumerate(factors.feature_index)])
  s = factors.num_dn
  return p.replace(
    layers=p.layers.replace(masks=dense[:, :, s:]),
    dn=p.dn.replace(masks=dense[:, :, :s]),
    interm=p.interm.replace(masks=mask_logits(factors.interm_embeds, factors.features[0])),
    mask_factors=factors if keep_factors else None,
  )


def test_mask_losses_from_the_factors_equal_those_of_the_dense_masks_and_skip_their_gradient():
  """With MaskFactors (the model's training outputs) the looped mask losses form only the matched queries' and DN
  slots' masks: the same terms and the same gradients with respect to the factors as when they are read from the
  dense masks, and no gradient reaches the dense masks (the matcher reads them without gradient)."""
  cfg = h.tiny_config(num_points=16)
  targets = {k: jnp.asarray(v) for k, v in h.make_targets(seed=2).items()}
  p, factors = _factored_predictions()

  def loss(factors, keep_factors):
    preds = _with_dense_masks(p, factors, keep_factors)
    return criterion.compute_losses(preds, targets, jax.random.key(4), cfg)

  results = {}
  for keep in (False, True):
    fn = jax.jit(jax.value_and_grad(lambda f, keep=keep: loss(f, keep), has_aux=True))
    (total, terms), grads = fn(factors)
    results[keep] = (total, terms, grads)
  (total_d, terms_d, grads_d), (total_f, terms_f, grads_f) = results[False], results[True]
  assert set(terms_d) == set(terms_f)
  assert {k for k in terms_f if k.startswith('loss_mask')} >= {
    'loss_mask',
    'loss_mask_0',
    'loss_mask_dn',
    'loss_mask_interm',
  }
  for name in terms_d:
    np.testing.assert_allclose(float(terms_f[name]), float(terms_d[name]), rtol=1e-5, atol=1e-7, err_msg=name)
  np.testing.assert_allclose(float(total_f), float(total_d), rtol=1e-6)
  for name in ('embeds', 'interm_embeds', 'features'):
    want, got = np.asarray(getattr(grads_d, name)), np.asarray(getattr(grads_f, name))
    assert np.abs(want).max() > 0, name
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max(), err_msg=name)

  # The factors' path: the dense masks get no gradient at all.
  def loss_of_dense(dense_layers, dense_dn, dense_interm):
    preds = _with_dense_masks(p, factors, True)
    preds = preds.replace(
      layers=preds.layers.replace(masks=dense_layers),
      dn=preds.dn.replace(masks=dense_dn),
      interm=preds.interm.replace(masks=dense_interm),
    )
    return criterion.compute_losses(preds, targets, jax.random.key(4), cfg)[0]

  preds = _with_dense_masks(p, factors, True)
  dense = (preds.layers.masks, preds.dn.masks, preds.interm.masks)
  for g in jax.jit(jax.grad(loss_of_dense, argnums=(0, 1, 2)))(*dense):
    assert not np.any(np.asarray(g))
