"""Mask Frozen-DETR mode (train.trainable = 'mask_branch'): the param split, and one real train step on a tiny model.

The step compiles with a low XLA optimization level (same computation, faster to build on 2 CPU cores).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dimaskdino_jax.config import ConfigError, validate
from dimaskdino_jax.modeling.model import build_model
from dimaskdino_jax.training import optimizer as optim_lib
from dimaskdino_jax.training import partition
from dimaskdino_jax.training.trainer import abstract_params, init_state, make_train_step
from tests.tiny import FAST, tiny_config


def _paths(tree):
  return {'/'.join(optim_lib.path_names(p)) for p, _ in jax.tree_util.tree_leaves_with_path(tree)}


def _fake_batch(config, bsz, rng):
  s, g = config.data.image_size, config.data.max_instances
  n = 2
  valid = np.arange(g)[None].repeat(bsz, 0) < n
  boxes = np.zeros((bsz, g, 4), np.float32)
  masks = np.zeros((bsz, g, s, s), np.uint8)
  for b in range(bsz):
    for j in range(n):
      y0, x0 = rng.integers(0, s // 2, 2)
      h, w = rng.integers(8, s // 2, 2)
      masks[b, j, y0 : y0 + h, x0 : x0 + w] = 1
      boxes[b, j] = [(x0 + w / 2) / s, (y0 + h / 2) / s, w / s, h / s]
  return {
    'image': jnp.asarray(rng.integers(0, 255, (bsz, s, s, 3), dtype=np.uint8)),
    'boxes': jnp.asarray(boxes),
    'labels': jnp.asarray(rng.integers(0, config.model.num_classes, (bsz, g)).astype(np.int32)),
    'valid': jnp.asarray(valid),
    'masks': jnp.asarray(masks),
  }


def test_split_and_merge_mask_branch():
  config = tiny_config(**{'train.trainable': 'mask_branch'})
  params = abstract_params(build_model(config), (1, 64, 64, 3))
  trainable, frozen = partition.split_params(params, partition.trainable_predicate(config))
  t_paths, f_paths, all_paths = _paths(trainable), _paths(frozen), _paths(params)
  assert t_paths and f_paths and not (t_paths & f_paths) and t_paths | f_paths == all_paths
  # Exactly the leaves of the listed modules, found here from the names independently of the predicate.
  expected = {p for p in all_paths if p.split('/')[1] in partition.MASK_BRANCH_MODULES.get(p.split('/')[0], ())}
  assert t_paths == expected
  assert {p.split('/')[1] for p in t_paths} == {
    'adapter_1',
    'adapter_1_norm',
    'layer_1',
    'layer_1_norm',
    'mask_features',
    'mask_embed',
    'mask_output_conv',
    'mask_output_conv_norm',
  }
  merged = partition.merge_params(trainable, frozen)
  assert jax.tree.structure(merged) == jax.tree.structure(params)
  # 'all' trains everything.
  assert partition.split_params(params, partition.trainable_predicate(tiny_config()))[0] is params


def test_trainable_config_is_validated():
  config = tiny_config()
  config.train.trainable = 'heads'
  with pytest.raises(ConfigError, match='train.trainable'):
    validate(config)


def test_frozen_step_updates_only_the_mask_branch():
  config = tiny_config(
    **{
      'train.trainable': 'mask_branch',
      'model.encoder.num_layers': 1,
      'model.decoder.num_layers': 2,
      'loss.num_points': 16,
      'matcher.num_points': 16,
      # A smaller graph to compile: the partition does not depend on these.
      'model.dn.mode': 'none',
      'loss.deep_supervision': False,
      'loss.interm_losses': False,
      'loss.di_aux_losses': False,
    }
  )
  config.optim.warmup_steps = 0
  model = build_model(config)
  shape = (1, 64, 64, 3)
  predicate = partition.trainable_predicate(config)
  tx = optim_lib.build_optimizer(config, partition.trainable_params(config, abstract_params(model, shape)))
  state_shape = jax.eval_shape(lambda: init_state(config, model, tx, shape))
  # The optimizer state of init_state holds moments for the trainable leaves only (the trainable params' tree).
  trainable_shape = partition.split_params(state_shape['params'], predicate)[0]
  mu = optax.tree_utils.tree_get(state_shape['opt_state'], 'mu')
  assert jax.tree.structure(mu) == jax.tree.structure(trainable_shape)
  opt_sizes = sum(x.size for x in jax.tree.leaves(state_shape['opt_state']) if len(x.shape) > 0)
  assert opt_sizes == 2 * partition.count(trainable_shape) < partition.count(state_shape['params'])  # mu and nu

  # The same state, initialized with a cheaper compilation than init_state's.
  init = jax.jit(model.init).lower(jax.random.key(0), jnp.zeros(shape, jnp.uint8)).compile(compiler_options=FAST)
  params = init(jax.random.key(0), jnp.zeros(shape, jnp.uint8))['params']
  state = {
    'step': jnp.zeros((), jnp.int32),
    'params': params,
    'frozen_bn': {},
    'opt_state': tx.init(partition.trainable_params(config, params)),
    'rng': jax.random.key(1),
    'nonfinite': {'consecutive': jnp.zeros((), jnp.int32), 'total': jnp.zeros((), jnp.int32)},
  }
  assert jax.tree.structure(state) == jax.tree.structure(state_shape)
  before = jax.tree.map(np.asarray, state['params'])
  trainable0, frozen0 = partition.split_params(before, predicate)

  batch = _fake_batch(config, 1, np.random.default_rng(0))
  step = jax.jit(make_train_step(config, model, tx)).lower(state, batch).compile(compiler_options=FAST)
  state, scalars = step(state, batch)
  assert np.isfinite(float(scalars['loss'])) and float(scalars['grad_norm']) > 0
  trainable1, frozen1 = partition.split_params(jax.tree.map(np.asarray, state['params']), predicate)
  for a, b in zip(jax.tree.leaves(frozen0), jax.tree.leaves(frozen1)):
    np.testing.assert_array_equal(a, b)  # bitwise unchanged
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(trainable0), jax.tree.leaves(trainable1))]
  assert sum(changed) >= len(changed) // 2, f'{sum(changed)} of {len(changed)} trainable leaves moved'
  assert jax.tree.structure(optax.tree_utils.tree_get(state['opt_state'], 'mu')) == jax.tree.structure(trainable0)
