"""The fine-tuning story (dimaskdino_jax/analysis/finetune.py) on the tiny model: pretrain on the 3-class shapes
data, write a 2-class COCO-format dataset (classes renamed and merged), fine-tune from the checkpoint with a class
map and evaluation during training, and train the same from scratch. The AP comparison itself is BENCHMARKS.md's."""

import json
import os

import numpy as np
import pytest

from dimaskdino_jax.analysis import finetune
from dimaskdino_jax.convert import init as init_lib
from dimaskdino_jax.convert import torch_checkpoint as tc
from dimaskdino_jax.convert.init import load_initial_weights
from dimaskdino_jax.data import shapes
from dimaskdino_jax.training.checkpoint import resolve_checkpoint, restore_stored_variables
from tests.convert.test_torch_checkpoint import random_variables
from tests.tiny import prepared_shapes
from tests.training import reliability_config


def test_relabel_renames_and_merges(tmp_path):
  path = shapes.write_shapes_dataset(str(tmp_path), seed=3, num_train=6, num_val=1, image_size=64)['train']
  with open(path) as f:
    coco = json.load(f)
  out = finetune.relabel(coco)
  assert [c['name'] for c in out['categories']] == ['disk', 'polygon']
  before = [a['category_id'] for a in coco['annotations']]
  after = [a['category_id'] for a in out['annotations']]
  assert after == [{1: 1, 3: 2, 7: 2}[c] for c in before] and {3, 7} & set(before)
  assert [a['segmentation'] for a in out['annotations']] == [a['segmentation'] for a in coco['annotations']]


@pytest.fixture(scope='module')
def story(tmp_path_factory):
  data_dir = prepared_shapes(tmp_path_factory, seed=1, num_train=24, num_val=4)
  base = reliability_config.config_for(data_dir, 4)
  workdir = str(tmp_path_factory.mktemp('finetune'))
  result = finetune.run(
    base, workdir, pretrain_steps=4, steps=2, eval_every=2, max_images=4, num_train=8, num_val=4, verbose=False
  )
  return base, workdir, result


def test_finetune_and_scratch_are_evaluated_during_training(story):
  _, workdir, result = story
  for name in ('finetune', 'scratch'):
    (step,) = result['curves'][name]
    assert step == 2 and 0.0 <= result['curves'][name][2]['AP_box'] <= 100.0
    assert os.listdir(os.path.join(workdir, name, 'best')) == ['2']
  assert result['table'].splitlines()[2].startswith('| 2 |')
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f)['table'] == result['table']


def test_the_checkpoint_initializes_the_two_class_model(story):
  """The fine-tuning config loads the pretrained run: every variable but the class heads as stored, the class heads'
  rows of circle (label 0) and square (label 1) for disk and polygon."""
  base, workdir, _ = story
  configs = finetune.run_configs(base, workdir, pretrain_steps=4, steps=2, eval_every=2, max_images=4)
  c = configs['finetune']
  fresh = random_variables(tc.model_shapes(c), seed=5)
  state = {'params': fresh['params'], 'frozen_bn': fresh['frozen_bn']}
  state = load_initial_weights(c, state, verbose=False)
  step_dir, step = resolve_checkpoint(checkpoint=c.train.init_checkpoint)
  assert step == 4
  pre = restore_stored_variables(step_dir)
  got, stored = init_lib._flat(state['params']), init_lib._flat(pre['params'])
  assert set(got) == set(stored)
  for path in sorted(set(got) - set(init_lib.CLASS_AXES)):
    np.testing.assert_array_equal(np.asarray(got[path]), stored[path], err_msg=path)
  kernel = np.asarray(state['params']['predictor']['class_embed']['kernel'])  # (D, 2)
  np.testing.assert_array_equal(kernel, pre['params']['predictor']['class_embed']['kernel'][:, [0, 1]])
  embedding = np.asarray(state['params']['predictor']['label_enc']['embedding'])  # (2, D)
  np.testing.assert_array_equal(embedding, pre['params']['predictor']['label_enc']['embedding'][[0, 1]])
