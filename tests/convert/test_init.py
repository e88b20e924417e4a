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
