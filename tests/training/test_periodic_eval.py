"""Evaluation during training (training/periodic_eval.py): the losses do not change, the best checkpoint is kept and
read back by eval.py --checkpoint best, the best so far survives a resume, bad input stops before any step."""

import importlib.util
import json
import os

import pytest

from dimaskdino_jax.config import ConfigError
from dimaskdino_jax.training import checkpoint as ckpt_lib
from dimaskdino_jax.training.trainer import train
from dimaskdino_jax.training.writers import read_metrics
from tests.tiny import prepared_shapes
from tests.training import reliability_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EVAL = {'train.eval_every': 2, 'train.eval_max_images': 4}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return prepared_shapes(tmp_path_factory, seed=1, num_train=24, num_val=4)


def config_for(data_dir, steps, **overrides):
  return reliability_config.config_for(data_dir, steps, **overrides)


def losses(workdir):
  return {r['step']: r['loss'] for r in read_metrics(workdir) if 'loss' in r}


def evals(workdir):
  return {r['step']: r for r in read_metrics(workdir) if 'eval/bbox_AP' in r}


def read_meta(step_dir):
  """The JSON meta item of a checkpoint step directory."""
  directory = os.path.join(step_dir, 'meta')
  for name in sorted(os.listdir(directory)):
    try:
      with open(os.path.join(directory, name)) as f:
        data = json.load(f)
    except (ValueError, UnicodeDecodeError, IsADirectoryError):
      continue
    if isinstance(data, dict) and 'metrics' in data:
      return data
  raise FileNotFoundError(f'{directory}: no meta JSON')


@pytest.fixture(scope='module')
def runs(data_dir, tmp_path_factory):
  """4 steps without evaluation, 4 with one every 2 steps, and the latter interrupted after step 2 and resumed.
  The final states of the first two are kept in FINAL_STATES (off, on)."""
  root = tmp_path_factory.mktemp('periodic')
  off, on, parts = str(root / 'off'), str(root / 'on'), str(root / 'parts')
  FINAL_STATES[:] = [train(config_for(data_dir, 4), off, verbose=False)]
  FINAL_STATES.append(train(config_for(data_dir, 4, **EVAL), on, verbose=False))
  train(config_for(data_dir, 2, **EVAL), parts, verbose=False)
  train(config_for(data_dir, 4, **EVAL), parts, verbose=False)  # resumes from the step-2 checkpoint
  return off, on, parts


FINAL_STATES = []


def test_same_losses_with_and_without_evaluation(runs):
  off, on, _ = runs
  assert sorted(losses(off)) == [1, 2, 3, 4]
  assert losses(on) == losses(off)  # bitwise: the evaluation reads the params only, draws no random numbers


def test_two_runs_give_the_same_weights_and_the_same_ap(runs, data_dir):
  """What `make demo` does, twice (issue 23: the demo's AP is repeatable): train from scratch, then evaluate every
  decoder layer. The two trainings of the fixture (with and without evaluation in between) end in bitwise equal
  weights, and the demo's evaluation of each gives the same metrics, per layer included, to the last digit."""
  import jax
  import numpy as np

  from dimaskdino_jax.evaluation.evaluator import evaluate

  off, on = FINAL_STATES
  for a, b in zip(jax.tree.leaves(off['params']), jax.tree.leaves(on['params']), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  config = config_for(data_dir, 4)
  metrics = [
    evaluate(config, {'params': s['params'], 'frozen_bn': s['frozen_bn']}, per_layer=True, verbose=False)
    for s in (off, on)
  ]
  assert len(metrics[0]['per_layer']) == config.model.decoder.num_layers + 1
  assert metrics[0] == metrics[1]


def test_metrics_and_the_best_checkpoint(runs, data_dir):
  _, on, _ = runs
  records = evals(on)
  assert sorted(records) == [2, 4]
  for r in records.values():
    for key in ('eval/bbox_AP', 'eval/bbox_AP50', 'eval/bbox_AP75', 'eval/segm_AP', 'eval/segm_AP50'):
      assert 0.0 <= r[key] <= 100.0, (key, r[key])
  # The best segm AP (default train.best_metric), the first step reaching it on ties.
  values = [(records[s]['eval/segm_AP'], -s) for s in (2, 4)]
  best_value, best_step = max(values)[0], -max(values)[1]
  assert records[4]['eval/best'] == best_value and records[4]['eval/best_step'] == best_step
  assert sorted(os.listdir(os.path.join(on, ckpt_lib.BEST_DIR))) == [str(best_step)]
  meta = read_meta(os.path.join(on, 'checkpoints', '4'))
  assert meta['metrics'] == {'best_metric': 'segm/AP', 'best_value': best_value, 'best_step': best_step}
  # eval.py --checkpoint best reads it back: the same AP as the evaluation during training.
  spec = importlib.util.spec_from_file_location('eval_cli', os.path.join(REPO, 'eval.py'))
  cli = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cli)
  argv = ['--config', f'tests/training/reliability_config.py:{data_dir}', '--workdir', on, '--checkpoint', 'best']
  metrics = cli.main([*argv, '--quiet', '--max-images', '4', '--num-visualize', '0'])
  assert metrics['segm']['AP'] == best_value
  assert os.path.isfile(os.path.join(on, 'eval_best', 'metrics.json'))


def test_the_best_so_far_survives_a_resume(runs):
  _, on, parts = runs
  assert losses(parts) == losses(on)
  a, b = evals(on), evals(parts)
  assert sorted(b) == [2, 4]
  for step in (2, 4):
    for key in ('eval/segm_AP', 'eval/best', 'eval/best_step'):
      assert a[step][key] == b[step][key], (step, key)
  assert os.listdir(os.path.join(on, ckpt_lib.BEST_DIR)) == os.listdir(os.path.join(parts, ckpt_lib.BEST_DIR))


def test_bad_input_stops_before_any_step(data_dir, tmp_path, monkeypatch):
  # The shapes dataset would otherwise be written for the missing split (data.name 'shapes'); a user's data is not.
  monkeypatch.setattr('dimaskdino_jax.data.prepare.ensure_shapes_dataset', lambda *a, **k: False)
  cases = [
    ({**EVAL, 'data.val_split': 'nope'}, "data.val_split = 'nope'"),
    ({'train.init_checkpoint': str(tmp_path / 'missing')}, 'train.init_checkpoint=.* is not a checkpoint'),
  ]
  for i, (overrides, message) in enumerate(cases):
    wd = tmp_path / f'run{i}'
    with pytest.raises(ConfigError, match=message):
      train(config_for(data_dir, 4, **overrides), str(wd), verbose=False)
    assert not (wd / 'metrics.jsonl').exists() and not os.listdir(wd / 'checkpoints')


def test_eval_cli_best_argv():
  spec = importlib.util.spec_from_file_location('eval_cli', os.path.join(REPO, 'eval.py'))
  cli = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cli)
  got = cli.best_checkpoint_argv(['--config', 'c.py', '--workdir', 'runs/x', '--checkpoint', 'best', '--quiet'])
  assert got == ['--config', 'c.py', '--quiet', '--checkpoint', os.path.join('runs/x', 'best')]
  assert cli.best_checkpoint_argv(['--checkpoint=best', '--workdir=w']) == ['--checkpoint', os.path.join('w', 'best')]
  with pytest.raises(SystemExit, match='needs --workdir'):
    cli.best_checkpoint_argv(['--checkpoint', 'best'])
