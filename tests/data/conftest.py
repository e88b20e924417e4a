"""Shared fixtures: one small shapes dataset per test session, written and prepared under a temp dir."""

import os

import pytest

from dimaskdino_jax.config import load_config
from dimaskdino_jax.data import prepare, shapes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_TRAIN, NUM_VAL = 40, 13


@pytest.fixture(scope='session')
def shapes_raw(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('shapes_raw'))
  shapes.write_shapes_dataset(root, seed=0, num_train=NUM_TRAIN, num_val=NUM_VAL, image_size=96)
  return root


@pytest.fixture(scope='session')
def data_dir(shapes_raw, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('prepared'))
  for split in ('train', 'val'):
    prepare.prepare_dataset(
      os.path.join(shapes_raw, split),
      os.path.join(shapes_raw, 'annotations', f'instances_{split}.json'),
      'shapes',
      split,
      out,
      verbose=False,
    )
  return out


def shapes_config(data_dir, **data_overrides):
  """configs/shapes.py pointed at the test data (96 px images resized to 128 canvases)."""
  config = load_config(os.path.join(REPO, 'configs', 'shapes.py'))
  config.data.data_dir = data_dir
  config.train.batch_size = 4
  config.eval.batch_size = 4
  for key, value in data_overrides.items():
    config.data[key] = value
  return config


def lsj_config(data_dir, **data_overrides):
  """configs/dimaskdino_r50_coco.py (LSJ) scaled to a 128 canvas and pointed at the test data."""
  config = load_config(os.path.join(REPO, 'configs', 'dimaskdino_r50_coco.py'))
  d = config.data
  d.name, d.data_dir, d.num_workers = 'shapes', data_dir, 0
  config.model.num_classes = 3  # the shapes dataset's categories
  d.image_size, d.max_instances, d.mask_stride = 128, 4, 4
  d.test_short_edge, d.test_max_size = 64, 128
  d.eval_canvases = ((64, 128), (128, 64), (64, 64), (128, 128))
  config.train.batch_size = 4
  config.eval.batch_size = 3
  for key, value in data_overrides.items():
    d[key] = value
  return config
