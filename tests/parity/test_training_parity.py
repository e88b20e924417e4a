"""Training parity with the official DI-MaskDINO code (fixtures train.npz / train.json of make_fixtures.py).

The official model (the reduced configuration of test_parity.py, same state_dict) ran one training step on three
images with 3, 0 and 2 instances: its DN queries (from its recorded torch draws), every Hungarian matching (with the
cost matrices), every loss term of SetCriterion, the gradient of the weighted total (backward) and one AdamW step of
train_net's optimizer (per-group lr / weight decay, full-model clipping). Here our model and criterion run on the same
batch with the same random draws, given explicitly: the DN noise as `targets['dn_noise']` (a DnNoise in our slot
layout) and the point-sampling uniforms (the matcher's torch.rand(1, P, 2) per image and PointRend's two torch.rand
calls per mask-loss call, mapped to each GT's / DN slot's pair) as `compute_losses(..., uniforms=)`.

Tolerances (relative errors, max |ours - official| / max |official| unless said otherwise; observed in brackets):
* DN content / anchors 1e-6 (a table lookup and elementwise box noise), the attention mask equal;
* assignments equal for the final layer, each aux layer, the encoder selection and both DI layers; cost matrices
  1e-4 (2.9e-6: the predictions carry the forward pass's 1e-6 .. 1e-5 differences, see test_parity.py);
* every loss term by name (54 terms) 1e-4 (6.4e-6, loss_giou_dn_0) and the weighted total 1e-4 (1.8e-7);
* gradients of the total: per-parameter norms 1e-4 relative for all 252 parameters (3.6e-6, label_enc) and the
  whole tensors of GRAD_TENSORS 1e-4 of their max (6.0e-6, a decoder layer's sampling offsets);
* one AdamW step: per-parameter update norms 1e-3 relative (2.1e-4) and whole updates 1e-3 of lr (1.4e-4): the
  first Adam step is lr * g / (|g| + eps), which magnifies the gradient's relative error where |g| is near eps.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimaskdino_jax.convert import convert_state_dict
from dimaskdino_jax.convert.torch_checkpoint import to_state_dict
from dimaskdino_jax.losses import matcher
from dimaskdino_jax.losses.criterion import compute_losses
from dimaskdino_jax.modeling.denoising import DnNoise, dn_attention_mask, dn_layout, dn_queries
from dimaskdino_jax.modeling.model import build_model
from dimaskdino_jax.training.optimizer import build_optimizer
from tests.parity.fixture_io import CANVAS, PARITY, decode_state_dict
from tests.parity.test_parity import FAST, FIXTURES, parity_config

TERM_TOL = 1e-4
COST_TOL = 1e-4
GRAD_TOL = 1e-4
UPDATE_TOL = 1e-3


def training_config(info):
  c = parity_config()
  pts = info['points']
  c.loss.num_points = pts['num_points']
  c.loss.oversample_ratio = pts['oversample_ratio']
  c.loss.importance_sample_ratio = pts['importance_sample_ratio']
  c.matcher.num_points = pts['num_points']
  o = info['optim']
  c.optim.lr, c.optim.weight_decay = o['lr'], o['weight_decay']
  c.optim.backbone_multiplier, c.optim.clip_norm = o['backbone_multiplier'], o['clip_norm']
  return c


def rel_error(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / max(np.max(np.abs(b)), 1e-12))


def load_golden():
  path = os.path.join(FIXTURES, 'train.npz')
  if not os.path.isfile(path):
    pytest.fail(f'{path}: training fixtures missing; regenerate them with python -m tests.parity.make_fixtures')
  with np.load(path) as z:
    arrays = {k: z[k] for k in z.files}
  with open(os.path.join(FIXTURES, 'train.json')) as f:
    info = json.load(f)
  return arrays, info


@pytest.fixture(scope='module')
def golden():
  return load_golden()


def _targets(g):
  b, n = g['train_labels'].shape
  masks = np.unpackbits(g['train_masks'])[: b * n * CANVAS[0] * CANVAS[1]].reshape(b, n, *CANVAS)
  return {
    'labels': jnp.asarray(g['train_labels']),
    'boxes': jnp.asarray(g['train_boxes']),
    'valid': jnp.asarray(g['train_valid']),
    'masks': jnp.asarray(masks),
    'dn_noise': DnNoise(jnp.asarray(g['train_dn_flip']), jnp.asarray(g['train_dn_classes']), g['train_dn_box']),
  }


SETS = ('final', 'aux', 'interm')


@pytest.fixture(scope='module')
def ours(golden):
  return run_ours(golden)


def run_ours(golden):
  """Our training step on the fixture batch with the official draws: (config, dict of numpy results)."""
  g, info = golden
  config = training_config(info)
  with np.load(os.path.join(FIXTURES, 'state_dict.npz')) as z:
    sd = decode_state_dict(z)
  variables = convert_state_dict(sd, config, source='tests/parity/fixtures/state_dict.npz')
  model = build_model(config)
  targets = _targets(g)
  images = jnp.asarray(g['train_images'])
  image_hw = jnp.asarray(info['image_hw'], jnp.int32)
  nl = PARITY['dec_layers']
  uniforms = {}
  for kind in ('match', 'loss'):
    uniforms[f'{kind}_final'] = g[f'train_u_{kind}_final']
    uniforms[f'{kind}_interm'] = g[f'train_u_{kind}_interm']
    uniforms[f'{kind}_aux'] = np.stack([g[f'train_u_{kind}_aux_{i}'] for i in range(nl)])
  # DN layers: ours [initial, layer 0, ..] = the official aux DN outputs 0 .. L-1, then its final DN output.
  uniforms['loss_dn'] = np.stack([g[f'train_u_loss_dn_{i}'] for i in range(nl)] + [g['train_u_loss_dn']])
  mc = config.matcher

  def step(params, frozen, images, image_hw, targets, uniforms):
    def loss_fn(p):
      preds = model.apply({'params': p, 'frozen_bn': frozen}, images, targets, train=True, image_hw=image_hw)
      total, terms = compute_losses(preds, targets, jax.random.key(0), config, uniforms=uniforms)
      return total, (terms, preds)

    (total, (terms, preds)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    heads = {
      'final': preds.final,
      'aux': jax.tree.map(lambda x: x[:-1], preds.layers),
      'interm': preds.interm,
    }
    costs = {
      k: matcher.matching_costs(h, targets, mc, points=jnp.asarray(uniforms[f'match_{k}'])) for k, h in heads.items()
    }
    costs['oldm'] = matcher.matching_costs(preds.di_aux, targets, mc)
    matches = dict(zip(costs, matcher.hungarian_match(list(costs.values()), targets['valid'])))
    tx = build_optimizer(config, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return total, terms, grads, updates, costs, matches

  fn = jax.jit(step)
  args = (variables['params'], variables['frozen_bn'], images, image_hw, targets, uniforms)
  out = fn.lower(*args).compile(compiler_options=FAST)(*args)
  total, terms, grads, updates, costs, matches = jax.device_get(out)
  grad_sd = to_state_dict({'params': grads, 'frozen_bn': variables['frozen_bn']}, config)
  update_sd = to_state_dict({'params': updates, 'frozen_bn': variables['frozen_bn']}, config)
  label_table = variables['params']['predictor']['label_enc']['embedding']
  return config, dict(
    total=total, terms=terms, grads=grad_sd, updates=update_sd, costs=costs, matches=matches, label_table=label_table
  )


def test_dn_queries_and_attention_mask(golden, ours):
  g, info = golden
  _, o = ours
  targets = _targets(g)
  info_dn, group = dn_layout(targets['valid'], PARITY['dn_num'])
  pad = int(g['train_dn_pad_size'])
  flipped = np.asarray(info_dn.positive) & g['train_dn_flip']
  assert flipped.any()  # the label noise is exercised
  assert pad == info['dn']['pad_size'] and int(info_dn.num_groups) == info['dn']['scalar']
  content, anchors = dn_queries(
    targets['dn_noise'], targets['labels'], targets['boxes'], info_dn, 0.4, lambda i: o['label_table'][i]
  )
  assert rel_error(content[:, :pad], g['train_dn_content']) <= 1e-6
  assert rel_error(anchors[:, :pad], g['train_dn_anchors']) <= 1e-6
  assert not np.any(np.asarray(content[:, pad:])) and not np.any(np.asarray(anchors[:, pad:]))  # inactive slots
  q = PARITY['k2']
  mask = np.asarray(dn_attention_mask(group, q))
  s = PARITY['dn_num']
  idx = np.concatenate([np.arange(pad), s + np.arange(q)])  # the official rows / columns
  np.testing.assert_array_equal(mask[np.ix_(idx, idx)], g['train_dn_attn_mask'])


def test_matching(golden, ours):
  g, _ = golden
  _, o = ours
  nl, ti = PARITY['dec_layers'], PARITY['ti_layers']
  pairs = [('final', o['matches']['final'], o['costs']['final']), ('interm', o['matches']['interm'], None)]
  pairs[1] = ('interm', o['matches']['interm'], o['costs']['interm'])
  pairs += [(f'aux_{i}', o['matches']['aux'][i], o['costs']['aux'][i]) for i in range(nl)]
  pairs += [(f'oldm_{i}', o['matches']['oldm'][i], o['costs']['oldm'][i]) for i in range(ti)]
  valid = g['train_valid']
  for name, match, cost in pairs:
    np.testing.assert_array_equal(match, g[f'train_match_{name}'], err_msg=name)
    want = g[f'train_cost_{name}']
    for b in range(valid.shape[0]):
      cols = valid[b]
      if cols.any():
        err = rel_error(cost[b][:, cols], want[b][:, cols])
        assert err <= COST_TOL, f'{name} image {b}: cost matrix relative error {err:.2e}'


def test_loss_terms(golden, ours):
  g, info = golden
  _, o = ours
  want = info['terms']
  assert set(o['terms']) == set(want), sorted(set(o['terms']) ^ set(want))
  errors = {k: abs(float(o['terms'][k]) - v) / max(abs(v), 1e-12) for k, v in want.items()}
  bad = {k: f'{e:.2e}' for k, e in errors.items() if e > TERM_TOL}
  assert not bad, bad
  total = float(g['train_total'])
  assert abs(float(o['total']) - total) / total <= TERM_TOL


def test_gradients(golden, ours):
  g, info = golden
  _, o = ours
  names = info['param_names']
  want = g['train_grad_norms']
  got = np.asarray([np.linalg.norm(np.asarray(o['grads'][k], np.float64)) for k in names])
  big = want >= 1e-6 * want.max()
  rel = np.abs(got - want) / np.maximum(want, 1e-30)
  worst = names[int(np.argmax(np.where(big, rel, 0)))]
  assert np.all(rel[big] <= GRAD_TOL), f'{worst}: gradient norm relative error {rel[names.index(worst)]:.2e}'
  assert np.all(np.abs(got[~big]) <= 1e-5 * want.max())  # (near-)zero gradients stay (near-)zero
  assert big.sum() >= 0.9 * len(names)  # the norms compared are nearly all (here all) parameters
  for key in [k.split(':', 1)[1] for k in g if k.startswith('train_grad:')]:
    err = rel_error(o['grads'][key], g[f'train_grad:{key}'])
    assert err <= GRAD_TOL, f'{key}: gradient relative error {err:.2e}'


def test_adamw_step(golden, ours):
  g, info = golden
  _, o = ours
  names = info['param_names']
  want = g['train_update_norms']
  got = np.asarray([np.linalg.norm(np.asarray(o['updates'][k], np.float64)) for k in names])
  rel = np.abs(got - want) / np.maximum(want, 1e-30)
  worst = names[int(np.argmax(rel))]
  assert np.all(rel <= UPDATE_TOL), f'{worst}: update norm relative error {rel.max():.2e}'
  lr = info['optim']['lr']
  for key in [k.split(':', 1)[1] for k in g if k.startswith('train_update:')]:
    err = float(np.max(np.abs(np.asarray(o['updates'][key], np.float64) - g[f'train_update:{key}']))) / lr
    assert err <= UPDATE_TOL, f'{key}: update error {err:.2e} of lr'
