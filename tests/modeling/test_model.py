"""Whole-model tests: shapes, parameter counts, ablation switches, DN isolation, compile-once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimaskdino_jax.config import ConfigError, load_config
from dimaskdino_jax.modeling.model import build_model
from dimaskdino_jax.modeling.outputs import mask_logits
from dimaskdino_jax.summary import abstract_variables, count_params
from tests.tiny import CANVAS, tiny_config


def targets(b=2, g=4, counts=(3, 1)):
  valid = np.zeros((b, g), bool)
  for i, n in enumerate(counts):
    valid[i, :n] = True
  rng = np.random.default_rng(0)
  boxes = np.concatenate([rng.uniform(0.3, 0.7, (b, g, 2)), rng.uniform(0.1, 0.3, (b, g, 2))], -1)
  return dict(
    boxes=jnp.asarray(boxes, jnp.float32),
    labels=jnp.asarray(rng.integers(0, 3, (b, g)), jnp.int32),
    valid=jnp.asarray(valid),
  )


def images(b=2, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 255, (b, CANVAS, CANVAS, 3)), jnp.uint8)


def init(config):
  model = build_model(config)
  variables = jax.jit(
    lambda i, t: model.init({'params': jax.random.key(0), 'dn': jax.random.key(1)}, i, t, train=True)
  )(images(), targets())
  return model, variables


@pytest.fixture(scope='module')
def base():
  return init(tiny_config())


def run(model, variables, imgs, tg=None, train=False, **kw):
  fn = jax.jit(lambda v, i, t: model.apply(v, i, t, train=train, rngs={'dn': jax.random.key(5)}, **kw))
  return fn(variables, imgs, tg)


def test_shapes_and_finiteness_train_and_eval(base):
  model, variables = base
  c = tiny_config()
  out = run(model, variables, images(), targets(), train=True)
  n_layers = c.model.decoder.num_layers + 1
  hm = CANVAS // 4
  assert out.layers.logits.shape == (n_layers, 2, 12, 3)
  assert out.layers.boxes.shape == (n_layers, 2, 12, 4)
  assert out.layers.masks.shape == (n_layers, 2, 12, hm, hm)
  assert out.interm.logits.shape == (2, 24, 3) and out.interm.masks.shape == (2, 24, hm, hm)
  assert out.di_aux.logits.shape == (c.model.di.ti_layers, 2, 24, 3) and out.di_aux.masks is None
  assert out.dn.logits.shape == (n_layers, 2, 10, 3) and out.dn.masks.shape == (n_layers, 2, 10, hm, hm)
  for leaf in jax.tree.leaves(out):
    assert np.isfinite(np.asarray(leaf, np.float32)).all()
  assert ((out.layers.boxes >= 0) & (out.layers.boxes <= 1)).all()
  ev = run(model, variables, images())
  assert ev.dn is None and ev.layers.masks.shape == (1, 2, 12, hm, hm)
  np.testing.assert_allclose(ev.layers.logits, out.layers.logits, rtol=1e-5, atol=1e-5)  # DN never leaks


@pytest.mark.parametrize('initial_pred,bato', [(True, True), (False, True), (True, False)])
def test_mask_factors_give_every_training_mask(initial_pred, bato):
  """Predictions.mask_factors (training mode): every mask of `layers`, `dn` and `interm` is its embedding times the
  map its feature_index names (F before BATO's layer, F' from it on), with and without the initial prediction and
  BATO; in eval mode there are none."""
  c = tiny_config()
  c.model.decoder.initial_pred = initial_pred
  c.model.bato.enabled = bato
  model, variables = init(c)
  out = run(model, variables, images(), targets(), train=True)
  f = out.mask_factors
  n = out.layers.logits.shape[0]
  assert len(f.feature_index) == n and f.features.shape[0] == (2 if bato else 1)
  if bato:
    first = c.model.bato.layer + (1 if initial_pred else 0)  # stack entry of BATO's decoder layer
    assert f.feature_index == tuple(int(i >= first) for i in range(n))
  dense = jnp.concatenate([out.dn.masks, out.layers.masks], axis=2)  # DN slots first, as the embeddings
  for i, fi in enumerate(f.feature_index):
    want = np.asarray(dense[i])
    got = np.asarray(mask_logits(f.embeds[i], f.features[fi]))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
  want = np.asarray(out.interm.masks)
  got = np.asarray(mask_logits(f.interm_embeds, f.features[0]))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
  assert run(model, variables, images()).mask_factors is None


def test_dn_slots_do_not_change_matching_queries(base):
  """Matching queries and the interm/DI outputs are identical with and without DN queries in the batch."""
  model, variables = base
  with_dn = run(model, variables, images(), targets(), train=True)
  without = run(model, variables, images(), None, train=True)
  np.testing.assert_allclose(with_dn.layers.logits, without.layers.logits, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(with_dn.layers.boxes, without.layers.boxes, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(with_dn.layers.masks, without.layers.masks, rtol=1e-4, atol=1e-4)


def test_inactive_dn_slots_do_not_change_active_slots():
  """Same groups (max_gt 3: 9 // 3 = 10 // 3 = 3), one more padded slot: active DN outputs identical.

  Noise scale 0 makes the DN content independent of the slot count.
  """
  outs = []
  for slots in (9, 10):
    c = tiny_config(**{'model.dn.num': slots, 'model.dn.noise_scale': 0.0})
    model, variables = init(c)
    outs.append(run(model, variables, images(), targets(counts=(3, 2)), train=True))
  np.testing.assert_allclose(outs[0].dn.logits, outs[1].dn.logits[:, :, :9], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(outs[0].dn.boxes, outs[1].dn.boxes[:, :, :9], rtol=1e-5, atol=1e-6)
  assert not bool(outs[1].dn_info.slot_active[9])


def test_compiles_once_for_fixed_shapes(base):
  model, variables = base
  traces = []

  def f(v, i):
    traces.append(1)
    return model.apply(v, i).layers.logits

  jf = jax.jit(f)
  a = jf(variables, images(seed=1))
  b = jf(variables, images(seed=2))
  assert len(traces) == 1
  assert not np.allclose(a, b)


def tree_names(variables):
  return {
    '/'.join(str(getattr(k, 'key', k)) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(variables)[0]
  }


def shapes_of(config, canvas=CANVAS):
  return abstract_variables(config, canvas=canvas)


def test_ablation_switches_change_the_parameter_tree():
  full = tree_names(shapes_of(tiny_config()))
  assert any('predictor/oldm/' in n for n in full) and any('query_guide_feature_update' in n for n in full)
  no_di = tree_names(
    shapes_of(
      tiny_config(**{'model.di.enabled': False, 'model.di.selection_ks': (12,), 'model.bato.guidance': 'decoder0'})
    )
  )
  assert not any('oldm' in n for n in no_di) and any('query_guide_feature_update' in n for n in no_di)
  no_bato = tree_names(shapes_of(tiny_config(**{'model.bato.enabled': False})))
  assert not any('query_guide_feature_update' in n or 'mask_output_conv' in n for n in no_bato)
  paper = tree_names(shapes_of(tiny_config(**{'model.formulation': 'paper'})))
  assert any('di_residual/cross_attn' in n for n in paper)
  assert any('query_guide_feature_update/mask_net' in n for n in paper)
  assert any('query_guide_feature_update/box_net' in n for n in paper)
  triple = tree_names(shapes_of(tiny_config(**{'model.di.selection_ks': (24, 18, 12)})))
  assert any('predictor/oldm_1/' in n for n in triple)
  rnd = tree_names(shapes_of(tiny_config(**{'model.di.random_position_tokens': True})))
  assert 'params/predictor/random_refpoints' in rnd
  # Without DI (MaskDINO-like, Table 3's baseline) the random tokens replace the selected anchors.
  no_di_rnd = {'model.di.enabled': False, 'model.di.selection_ks': (12,), 'model.di.random_position_tokens': True}
  assert 'params/predictor/random_refpoints' in tree_names(shapes_of(tiny_config(**no_di_rnd)))


def test_bato_off_leaves_memory_and_mask_features_untouched(base):
  c = tiny_config(**{'model.bato.enabled': False})
  model, variables = init(c)
  out = run(model, variables, images())
  assert 'bato_memory' not in out.extras and 'updated_mask_features' not in out.extras
  # With BATO off the model is DI + plain decoder: parameters are a strict subset of the full model's.
  assert tree_names(variables['params']) < tree_names(base[1]['params'])


def test_di_off_is_maskdino_single_selection():
  c = tiny_config(**{'model.di.enabled': False, 'model.di.selection_ks': (12,)})
  model, variables = init(c)
  out = run(model, variables, images(), targets(), train=True)
  assert out.di_aux is None and out.interm.logits.shape == (2, 12, 3)
  # Q_bal is exactly the top-12 encoder tokens (detached selection), in top-k order.
  np.testing.assert_array_equal(out.extras['enc_topk_index'].shape, (2, 12))


@pytest.mark.parametrize(
  'overrides',
  [
    {'model.formulation': 'paper', 'model.bato.guidance': 'Q_bal', 'model.bato.layer': 0},
    {'model.bato.guidance': 'T_i'},
    {'model.bato.guidance': 'T_s1'},
    {'model.bato.guiding_token_generation': False},
    {'model.di.selection_ks': (24, 18, 12)},
    {'model.di.random_position_tokens': True, 'model.decoder.box_init': 'bitmask'},
    {'model.di.random_position_tokens': True, 'model.di.enabled': False, 'model.di.selection_ks': (12,)},
  ],
)
def test_variants_run(overrides):
  c = tiny_config(**overrides)
  model, variables = init(c)
  out = run(model, variables, images(), targets(), train=True)
  assert out.layers.logits.shape[2] == 12
  for leaf in jax.tree.leaves(out):
    assert np.isfinite(np.asarray(leaf, np.float32)).all()
  if overrides.get('model.di.selection_ks') == (24, 18, 12):
    assert len(out.di_aux_more) == 1 and out.di_aux_more[0].logits.shape == (2, 2, 18, 3)


def test_random_position_tokens_without_di_set_the_decoder_anchors():
  # DI off (MaskDINO-like): the learned random tokens replace the selected anchors, so changing them changes the
  # decoder's boxes (a created-but-unused parameter would leave them equal).
  c = tiny_config(
    **{'model.di.enabled': False, 'model.di.selection_ks': (12,), 'model.di.random_position_tokens': True}
  )
  model, variables = init(c)
  shifted = jax.tree.map(lambda x: x, variables)
  shifted['params']['predictor']['random_refpoints'] = variables['params']['predictor']['random_refpoints'] + 1.0
  a, b = (run(model, v, images()).layers.boxes for v in (variables, shifted))
  assert not np.allclose(np.asarray(a), np.asarray(b), atol=1e-3)


def test_r50_parameter_counts():
  """52,286,232 unique parameters counted from the official state_dict (docs/architecture.md, "Checkpoints"): exact."""
  di = shapes_of(load_config('configs/dimaskdino_r50_coco.py'), 256)['params']
  total = count_params(di)
  assert total == 52_286_232, total
  assert abs(count_params(di['backbone']) - 23.45e6) / 23.45e6 < 0.003
  assert abs(count_params(di['pixel_decoder']) - 14.06e6) / 14.06e6 < 0.003
  pred = di['predictor']
  di_only = sum(count_params(v) for k, v in pred.items() if k.startswith(('oldm', 'query_guide', 'mask_output')))
  assert abs(di_only - 4.87e6) / 4.87e6 < 0.003, di_only
  md = count_params(shapes_of(load_config('configs/maskdino_r50_coco.py'), 256)['params'])
  assert abs(md - 52.1e6) / 52.1e6 < 0.003, md


def test_r50_output_shapes_eval_shape():
  c = load_config('configs/dimaskdino_r50_coco.py')
  model = build_model(c)
  v = shapes_of(c, 256)
  out = jax.eval_shape(lambda v, i: model.apply(v, i), v, jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.uint8))
  assert out.layers.logits.shape == (7, 1, 300, 80) and out.layers.masks.shape == (1, 1, 300, 64, 64)
  assert out.interm.logits.shape == (1, 600, 80) and out.di_aux.boxes.shape == (2, 1, 600, 4)


@pytest.mark.parametrize(
  'field, value, needle',
  [
    ('model.di.selection_ks', (100, 200), 'model.di.selection_ks'),
    ('model.formulation', 'fancy', 'model.formulation'),
    ('data.image_size', 100, 'data.image_size'),
    ('optim.lr_scheduler', 'WarmupPolyLR', 'optim.lr_scheduler'),
    ('optim.lr_end', 1.0, 'optim.lr_end'),
  ],
)
def test_config_validation_names_the_field(field, value, needle):
  with pytest.raises(ConfigError, match=needle):
    tiny_config(**{field: value})


def test_k1_larger_than_token_count():
  with pytest.raises(ConfigError, match='encoder tokens'):
    tiny_config(**{'model.di.selection_ks': (500, 12)})


def test_shapes_config_output_shapes_eval_shape():
  """The embedded demo config (configs/shapes.py) in training mode, shapes only."""
  c = load_config('configs/shapes.py')
  model = build_model(c)
  s, g = c.data.image_size, c.data.max_instances
  v = shapes_of(c, s)
  tg = dict(
    boxes=jax.ShapeDtypeStruct((2, g, 4), jnp.float32),
    labels=jax.ShapeDtypeStruct((2, g), jnp.int32),
    valid=jax.ShapeDtypeStruct((2, g), jnp.bool_),
  )
  out = jax.eval_shape(
    lambda v, i, t: model.apply(v, i, t, train=True, rngs={'dn': jax.random.key(0)}),
    v,
    jax.ShapeDtypeStruct((2, s, s, 3), jnp.uint8),
    tg,
  )
  n, q, k1 = c.model.decoder.num_layers + 1, c.model.decoder.num_queries, c.model.di.selection_ks[0]
  assert out.layers.logits.shape == (n, 2, q, 3) and out.layers.masks.shape == (n, 2, q, s // 4, s // 4)
  assert out.interm.masks.shape == (2, k1, s // 4, s // 4) and out.dn.boxes.shape == (n, 2, c.model.dn.num, 4)


def test_backbone_norm_switch_and_class_prior():
  gn = shapes_of(tiny_config())  # the shapes config trains a GN backbone from scratch
  assert 'frozen_bn' not in gn and 'scale' in gn['params']['backbone']['stem']['norm']
  fbn = shapes_of(tiny_config(**{'model.backbone.norm': 'FrozenBN'}))
  assert (
    'norm' not in fbn['params']['backbone']['stem'] and 'running_var' in fbn['frozen_bn']['backbone']['stem']['norm']
  )
  prior = tiny_config(**{'model.class_prior_prob': 0.01})
  model = build_model(prior)
  v = jax.jit(lambda i: model.init({'params': jax.random.key(0)}, i))(images())
  np.testing.assert_allclose(v['params']['predictor']['class_embed']['bias'], -np.log(99.0), rtol=1e-6)
  model = build_model(tiny_config(**{'model.class_prior_prob': 0.0}))  # official: torch's Linear init
  bias = np.asarray(
    jax.jit(lambda i: model.init({'params': jax.random.key(0)}, i))(images())['params']['predictor']['class_embed'][
      'bias'
    ]
  )
  assert np.all(np.abs(bias) <= 1 / np.sqrt(32)) and np.ptp(bias) > 0


def test_summary_cli_prints_total_last(capsys):
  from dimaskdino_jax import summary

  summary.main(['--config', 'configs/shapes.py', '--max-lines', '5'])
  lines = capsys.readouterr().out.strip().splitlines()
  want = count_params(abstract_variables(load_config('configs/shapes.py'))['params'])
  assert lines[-1] == f'total_params: {want}'
  assert any(line.startswith('backbone: ') for line in lines) and len(lines) > 5


def test_official_q_bal_is_t_s2_so_their_guidance_is_one_model():
  # In the official formulation the second selection's tokens are Q_bal (no residual cross-attention: that is the
  # paper's Eq. 4), so BATO guided by Q_bal and by T_s2 is the same model (the ablation grid runs it once).
  model, variables = init(tiny_config(**{'model.bato.guidance': 'T_s2'}))
  outs = [run(m, variables, images()) for m in (model, build_model(tiny_config(**{'model.bato.guidance': 'Q_bal'})))]
  for a, b in zip(jax.tree.leaves(outs[0].layers), jax.tree.leaves(outs[1].layers)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
