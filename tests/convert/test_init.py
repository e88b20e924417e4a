"""Initial weights for training: train.init_checkpoint (fine-tuning a converted checkpoint), model.backbone.weights."""

import pickle

import jax
import numpy as np
import pytest

from dimaskdino_jax.config import ConfigError, validate
from dimaskdino_jax.convert import save_variables
from dimaskdino_jax.convert import torch_checkpoint as tc
from dimaskdino_jax.convert.init import load_initial_weights
from tests.convert.test_torch_checkpoint import assert_trees_equal, random_variables
from tests.tiny import tiny_config


@pytest.fixture(scope='module')
def setup():
  c = tiny_config(**{'model.backbone.norm': 'FrozenBN'})
  shapes = tc.model_shapes(c)
  return c, shapes, random_variables(shapes, seed=0), random_variables(shapes, seed=1)


def fresh_state(variables):
  return {'step': np.int32(0), 'params': variables['params'], 'frozen_bn': variables['frozen_bn'], 'rng': None}


def test_init_checkpoint_replaces_every_variable(setup, tmp_path):
  c, _, initial, pretrained = setup
  save_variables(tmp_path / 'converted', c, pretrained)
  c = c.copy_and_resolve_references()
  c.train.init_checkpoint = str(tmp_path / 'converted')
  validate(c)
  state = load_initial_weights(c, fresh_state(initial), verbose=False)
  assert_trees_equal({k: state[k] for k in ('params', 'frozen_bn')}, pretrained)


def test_backbone_weights_replace_the_backbone_only(setup, tmp_path):
  c, _, initial, pretrained = setup
  sd = tc.to_state_dict(pretrained, c)
  path = tmp_path / 'R-50.pkl'
  with open(path, 'wb') as f:
    pickle.dump({'model': {k[len('backbone.') :]: v for k, v in sd.items() if k.startswith('backbone.')}}, f)
  c = c.copy_and_resolve_references()
  c.model.backbone.weights = str(path)
  validate(c)
  state = load_initial_weights(c, fresh_state(initial), verbose=False)
  for col in ('params', 'frozen_bn'):
    assert_trees_equal(state[col]['backbone'], pretrained[col]['backbone'])
  assert_trees_equal(state['params']['predictor'], initial['params']['predictor'])
  same = jax.tree.map(np.array_equal, state['params']['pixel_decoder'], initial['params']['pixel_decoder'])
  assert all(jax.tree.leaves(same))


def test_nothing_configured_leaves_the_state(setup):
  c, _, initial, _ = setup
  state = fresh_state(initial)
  assert load_initial_weights(c, state, verbose=False) is state


def test_config_validation():
  c = tiny_config(**{'model.backbone.norm': 'FrozenBN'})
  c.model.backbone.weights = 'resnet50.onnx'
  with pytest.raises(ConfigError, match='model.backbone.weights'):
    validate(c)
  c.model.backbone.weights = 'R-50.pkl'
  c.train.init_checkpoint = 'runs/converted'
  with pytest.raises(ConfigError, match='not both'):
    validate(c)
  c.train.init_checkpoint = ''
  c.model.backbone.norm = 'GN'
  with pytest.raises(ConfigError, match='FrozenBN'):
    validate(c)


# ------------------------------------------------------------------------------------------------ partial loading
from dimaskdino_jax.convert import init as init_lib  # noqa: E402


def config_with(c, **fields):
  c = c.copy_and_resolve_references()
  for k, v in fields.items():
    c.train[k] = v
  validate(c)
  return c


@pytest.fixture(scope='module')
def two_class(setup):
  """The tiny model with 2 classes: fresh random variables (its own shapes)."""
  c, _, _, _ = setup
  c2 = c.copy_and_resolve_references()
  c2.model.num_classes = 2
  return c2, random_variables(tc.model_shapes(c2), seed=2)


def flat(tree):
  return init_lib._flat(tree)


def test_different_class_count_loads_the_rest_and_reinitializes_the_heads(setup, two_class, tmp_path, capsys):
  c, _, _, pretrained = setup
  c2, fresh = two_class
  save_variables(tmp_path / 'src', c, pretrained)
  with pytest.raises(Exception, match='predictor/class_embed/kernel'):  # init_strict: today's behaviour
    load_initial_weights(config_with(c2, init_checkpoint=str(tmp_path / 'src'), init_strict=True), fresh_state(fresh))
  state = load_initial_weights(config_with(c2, init_checkpoint=str(tmp_path / 'src')), fresh_state(fresh))
  out = capsys.readouterr().out
  # The summary names each re-initialized leaf with both shapes; counts add up to the model's leaves.
  dim, n = c.model.hidden_dim, c.model.num_classes
  assert f'params/predictor/class_embed/kernel: ({dim}, {n}) vs ({dim}, 2)' in out
  assert f'params/predictor/label_enc/embedding: ({n}, {dim}) vs (2, {dim})' in out
  got, src, new = (flat({k: t[k] for k in ('params', 'frozen_bn')}) for t in (state, pretrained, fresh))
  reinit = {'params/' + p for p in init_lib.CLASS_AXES}
  assert set(got) == set(new)
  for path in got:
    expected = new[path] if path in reinit else src[path]
    np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(expected), err_msg=path)
  assert f'{len(got) - 3} variables loaded, 0 class heads mapped, 3 re-initialized, 0 missing, 0 unexpected' in out


def test_class_map_keeps_the_matching_rows(setup, two_class, tmp_path):
  c, _, _, pretrained = setup
  c2, fresh = two_class
  c = c.copy_and_resolve_references()
  c.data.data_dir = str(tmp_path / 'not_prepared')  # the source run's dataset is not prepared here
  save_variables(tmp_path / 'src', c, pretrained)
  # The source run's config.json names no prepared dataset here: an 80-class checkpoint maps through COCO's names.
  c80 = c.copy_and_resolve_references()
  c80.model.num_classes = 80
  pre80 = random_variables(tc.model_shapes(c80), seed=3)
  save_variables(tmp_path / 'coco', c80, pre80)  # an 80-class checkpoint: COCO 2017 categories
  cfg = config_with(c2, init_checkpoint=str(tmp_path / 'coco'), init_class_map='car, -')  # 'car' = id 3, label 2
  state = load_initial_weights(cfg, fresh_state(fresh), verbose=False)
  k_src = np.asarray(pre80['params']['predictor']['class_embed']['kernel'])  # (D, 80)
  k_new = np.asarray(fresh['params']['predictor']['class_embed']['kernel'])  # (D, 2)
  k_got = np.asarray(state['params']['predictor']['class_embed']['kernel'])
  np.testing.assert_array_equal(k_got[:, 0], k_src[:, 2])
  np.testing.assert_array_equal(k_got[:, 1], k_new[:, 1])
  e_got = np.asarray(state['params']['predictor']['label_enc']['embedding'])  # (2, D)
  np.testing.assert_array_equal(e_got[0], np.asarray(pre80['params']['predictor']['label_enc']['embedding'])[2])
  b_got = np.asarray(state['params']['predictor']['class_embed']['bias'])
  assert b_got[0] == np.asarray(pre80['params']['predictor']['class_embed']['bias'])[2]
  # by id: 1 = person (label 0), 90 = toothbrush (label 79)
  state = load_initial_weights(
    config_with(c2, init_checkpoint=str(tmp_path / 'coco'), init_class_map='90,1'), fresh_state(fresh), verbose=False
  )
  k_got = np.asarray(state['params']['predictor']['class_embed']['kernel'])
  np.testing.assert_array_equal(k_got, k_src[:, [79, 0]])
  # unknown class / id, and a 3-class checkpoint whose names nobody knows: the field is named, before loading
  for spec, message in (('car,unicorn', "'unicorn' is not a category"), ('car,12', 'category id 12')):
    with pytest.raises(ConfigError, match=message):
      init_lib.check_initial_weights(config_with(c2, init_checkpoint=str(tmp_path / 'coco'), init_class_map=spec))
  with pytest.raises(ConfigError, match='cannot tell the class names'):
    init_lib.check_initial_weights(config_with(c2, init_checkpoint=str(tmp_path / 'src'), init_class_map='a,b'))


def test_init_checkpoint_that_is_not_a_checkpoint(setup, tmp_path):
  c, _, _, _ = setup
  (tmp_path / 'empty').mkdir()
  for path in (tmp_path / 'empty', tmp_path / 'missing'):
    with pytest.raises(ConfigError, match='train.init_checkpoint=.* is not a checkpoint'):
      init_lib.check_initial_weights(config_with(c, init_checkpoint=str(path)))


def test_class_map_validation(setup):
  c, _, _, _ = setup
  with pytest.raises(
    ConfigError, match=f'train.init_class_map: 2 entries for model.num_classes = {c.model.num_classes}'
  ):
    config_with(c, init_checkpoint='x', init_class_map='a,b')
  with pytest.raises(ConfigError, match='train.init_class_map: maps the classes of train.init_checkpoint'):
    config_with(c, init_class_map='names')
  with pytest.raises(ConfigError, match='train.best_metric'):
    config_with(c, best_metric='segm/AR')


def test_coco_categories_match_detectron2():
  """The built-in COCO list is detectron2's `COCO_CATEGORIES` (isthing == 1), read from the official source."""
  import ast
  import os

  path = '/work/official/detectron2/detectron2/data/datasets/builtin_meta.py'
  if not os.path.isfile(path):
    pytest.skip(f'{path} not available')
  tree = ast.parse(open(path).read())
  value = next(
    n.value for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], 'id', '') == 'COCO_CATEGORIES'
  )
  reference = [(d['id'], d['name']) for d in ast.literal_eval(value) if d['isthing'] == 1]
  from dimaskdino_jax.convert.coco_categories import COCO_CATEGORIES

  assert list(COCO_CATEGORIES) == reference
