"""A tiny DI-MaskDINO config (hidden 32, 64 x 64 canvas) shared by tests that compile the model."""

import os

from dimaskdino_jax.config import load_config, validate
from dimaskdino_jax.data import prepare, shapes

CANVAS = 64


def set_field(config, dotted, value):
  node = config
  *path, leaf = dotted.split('.')
  for p in path:
    node = node[p]
  node[leaf] = value


def tiny_config(**overrides):
  """configs/shapes.py shrunk further; overrides are dotted field names -> values."""
  c = load_config('configs/shapes.py')
  c.model.hidden_dim = 32
  c.model.encoder.num_groups = 16
  c.model.encoder.ffn_dim = 64
  c.model.decoder.ffn_dim = 64
  c.model.di.selection_ks = (24, 12)
  c.model.decoder.num_queries = 12
  c.model.bato.num_guiding_tokens = 4
  c.model.dn.num = 10
  c.loss.num_points = 64
  c.matcher.num_points = 64
  c.data.image_size = CANVAS
  c.data.eval_canvases = ((CANVAS, CANVAS),)
  c.data.test_short_edge = CANVAS
  c.data.test_max_size = CANVAS
  for key, value in overrides.items():
    set_field(c, key, value)
  validate(c)
  return c


def prepared_shapes(tmp_path_factory, seed=0, num_train=8, num_val=4, image_size=64):
  """Writes a small shapes dataset and prepares its train and val splits; returns the prepared data dir."""
  raw = str(tmp_path_factory.mktemp('shapes_raw'))
  shapes.write_shapes_dataset(raw, seed=seed, num_train=num_train, num_val=num_val, image_size=image_size)
  out = str(tmp_path_factory.mktemp('prepared'))
  for split in ('train', 'val'):
    ann = os.path.join(raw, 'annotations', f'instances_{split}.json')
    prepare.prepare_dataset(os.path.join(raw, split), ann, 'shapes', split, out, verbose=False)
  return out


# The compiler options of tests/conftest.py's XLA_FLAGS, for programs compiled with explicit options.
FAST = {
  'xla_backend_optimization_level': 0,
  'xla_llvm_disable_expensive_passes': True,
  'xla_cpu_use_fusion_emitters': False,
}


_VARIABLES: dict = {}


def init_variables(config_key: str, make_config):
  """Random variables of the model of make_config() (64 x 64 input), compiled with FAST options; cached per process
  under config_key (the same key must mean the same model), so test modules sharing a tiny model initialize it once."""
  if config_key in _VARIABLES:
    return _VARIABLES[config_key]
  import jax
  import jax.numpy as jnp

  from dimaskdino_jax.modeling.model import build_model

  model = build_model(make_config())
  images = jnp.zeros((1, CANVAS, CANVAS, 3), jnp.uint8)
  init = jax.jit(model.init).lower(jax.random.key(0), images).compile(compiler_options=FAST)
  _VARIABLES[config_key] = init(jax.random.key(0), images)
  return _VARIABLES[config_key]
