"""End-to-end training on a generated dataset: the loss decreases, and a resumed run equals an uninterrupted one."""

import os

import jax
import numpy as np
import pytest

from dimaskdino_jax.training.trainer import DataCounts, train
from dimaskdino_jax.training.writers import read_metrics
from tests.tiny import prepared_shapes
from tests.training import reliability_config


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return prepared_shapes(tmp_path_factory, seed=1, num_train=24, num_val=4)


def config_for(data_dir, steps, **overrides):
  """The reliability tests' config (same compiled step) with a checkpoint every 3 steps."""
  return reliability_config.config_for(data_dir, steps, **{'train.checkpoint_every': 3, **overrides})


def losses(workdir):
  return {r['step']: r['loss'] for r in read_metrics(os.path.join(workdir, 'metrics.jsonl'))}


def test_loss_decreases(data_dir, tmp_path):
  wd = str(tmp_path / 'run')
  train(config_for(data_dir, 40, **{'optim.lr': 5e-4, 'model.decoder.box_init': 'none'}), wd, verbose=False)
  curve = losses(wd)
  assert sorted(curve) == list(range(1, 41))
  first, last = np.mean([curve[s] for s in range(1, 6)]), np.mean([curve[s] for s in range(36, 41)])
  # Measured: 0.82 with box_init='none'; 0.97-1.0 with mask2box anchors, which degenerate early from scratch.
  assert np.isfinite(last) and last < 0.9 * first, (first, last)
  records = read_metrics(os.path.join(wd, 'metrics.jsonl'))
  assert all(r['data_record_errors'] == 0 and r['data_instances_dropped'] >= 0 for r in records)  # clean data


def test_data_counts_per_interval_and_total(capsys):
  counts = DataCounts()
  counts.add({'record_error': np.array([True, False, True]), 'num_dropped': np.array([0, 4, 1], np.int32)})
  counts.add({'image': np.zeros(2)})  # an iterator without the count keys adds nothing
  assert counts.interval() == {'data_record_errors': 2, 'data_instances_dropped': 5}
  counts.add({'record_error': np.array([False, True]), 'num_dropped': np.array([2, 0], np.int32)})
  assert counts.interval() == {'data_record_errors': 1, 'data_instances_dropped': 2}
  assert counts.interval() == {'data_record_errors': 0, 'data_instances_dropped': 0}
  counts.report()
  assert '3 undecodable records' in capsys.readouterr().out and counts.total['data_instances_dropped'] == 7


def test_resume_matches_uninterrupted(data_dir, tmp_path):
  full, parts = str(tmp_path / 'full'), str(tmp_path / 'parts')
  state_full = train(config_for(data_dir, 6), full, verbose=False)
  train(config_for(data_dir, 3), parts, verbose=False)  # "interrupted" after the step-3 checkpoint
  state_parts = train(config_for(data_dir, 6), parts, verbose=False)  # resumes from step 3
  assert int(state_parts['step']) == int(state_full['step']) == 6
  a, b = losses(full), losses(parts)
  assert sorted(b) == list(range(1, 7))
  for s in range(1, 7):
    assert a[s] == pytest.approx(b[s], rel=1e-6), (s, a[s], b[s])
  for x, y in zip(jax.tree.leaves(state_full['params']), jax.tree.leaves(state_parts['params'])):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
