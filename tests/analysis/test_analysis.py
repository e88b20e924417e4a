"""The analysis commands: settings, resume/skip, tables with relative drops, plots, eval.py --per-layer's figure.

Training and evaluation are replaced by stand-ins (the real ones are tested in tests/training and tests/evaluation):
the stand-in metrics are a known function of each setting's config, so the tables can be checked exactly.
"""

import importlib.util
import json
import math
import os

import pytest
from PIL import Image

from dimaskdino_jax.analysis import ablation, imbalance, runner
from dimaskdino_jax.analysis.plots import plot_per_layer, plot_settings
from dimaskdino_jax.config import ConfigError
from dimaskdino_jax.evaluation import evaluator
from dimaskdino_jax.training import checkpoint as ckpt_lib
from tests.evaluation.test_evaluator import TINY_OVERRIDES
from tests.tiny import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = ['--config', os.path.join(REPO, 'configs', 'shapes.py')] + [
  f'--config.{k}={v}' for k, v in TINY_OVERRIDES.items()
]


def _metrics(box, mask):
  names = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')
  return {'bbox': {n: float(box) for n in names}, 'segm': {n: float(mask) for n in names}}


class Fake:
  """Stand-ins for train / evaluate: AP box = 40 x detection_weight_scale (+ 5 with random position tokens off),
  AP mask = 30 - 3 x decoder layers; records every call."""

  def __init__(self):
    self.trained, self.evaluated = [], []

  def train(self, config, workdir, verbose):
    self.trained.append((os.path.basename(workdir), config))
    return {'params': {}, 'frozen_bn': {}}

  def evaluate(self, config, variables, out_dir, max_images, verbose):
    self.evaluated.append((out_dir, max_images))
    box = 40.0 * config.loss.detection_weight_scale + (0.0 if config.model.di.random_position_tokens else 5.0)
    return _metrics(box, 30.0 - 3 * config.model.decoder.num_layers)


def _png(path):
  with Image.open(path) as im:
    assert im.format == 'PNG' and im.width > 100 and im.height > 100
    return im.size


def test_imbalance_table_drops_and_resume(tmp_path):
  fake = Fake()
  wd = str(tmp_path / 't3')
  out = imbalance.main(ARGS + ['--workdir', wd, '--steps', '2', '--max-images', '3', '--quiet'], **vars_of(fake))
  assert [n for n, _ in fake.trained] == ['standard', 'det_weight_0.1', 'random_pos']
  configs = dict(fake.trained)
  assert all(c.train.num_steps == 2 for c in configs.values())
  assert configs['det_weight_0.1'].loss.detection_weight_scale == 0.1
  assert configs['standard'].loss.detection_weight_scale == 1.0
  assert (
    configs['random_pos'].model.di.random_position_tokens and not configs['standard'].model.di.random_position_tokens
  )
  assert configs['standard'].model.hidden_dim == 32  # the --config overrides reach every setting
  assert all(m == 3 for _, m in fake.evaluated)
  # Standard: box 45; x0.1: box 9 -> drop 80 %; random pos: box 40 -> drop 11.1 %; masks equal -> drop 0.
  drops = out['relative_drop_percent']
  assert drops['det_weight_0.1']['box'] == pytest.approx(100 * (45 - 9) / 45)
  assert drops['random_pos']['box'] == pytest.approx(100 * 5 / 45)
  assert drops['random_pos']['mask'] == 0.0
  lines = open(os.path.join(wd, 'table.md')).read().splitlines()
  assert lines[0].startswith('| setting | AP box | rel. drop box') and len(lines) == 5
  assert '| det_weight_0.1 | 9.00 | +80.0 % | 21.00 | +0.0 % |' in lines
  saved = json.load(open(os.path.join(wd, 'results.json')))
  assert [r['name'] for r in saved['rows']] == ['standard', 'det_weight_0.1', 'random_pos']
  _png(os.path.join(wd, 'results.png'))
  for name in ('standard', 'det_weight_0.1', 'random_pos'):
    assert os.path.isfile(os.path.join(wd, name, runner.RESULT_FILE))

  # Run again: every setting is done, nothing trains; more steps: everything trains again.
  fake2 = Fake()
  again = imbalance.main(ARGS + ['--workdir', wd, '--steps', '2', '--quiet'], **vars_of(fake2))
  assert fake2.trained == [] and again['table'] == out['table'] and again['table'].startswith('| setting |')
  os.remove(os.path.join(wd, 'random_pos', runner.RESULT_FILE))  # e.g. interrupted before its evaluation
  imbalance.main(ARGS + ['--workdir', wd, '--steps', '2', '--quiet'], **vars_of(fake2))
  assert [n for n, _ in fake2.trained] == ['random_pos']
  imbalance.main(ARGS + ['--workdir', wd, '--steps', '3', '--quiet'], **vars_of(fake2))
  assert len(fake2.trained) == 4


def vars_of(fake):
  return {'train_fn': fake.train, 'evaluate_fn': fake.evaluate}


def test_default_ablation_grid_is_valid_and_distinct():
  config = tiny_config()  # k1 = 24, k2 = 12, 3 decoder layers
  grid = ablation.default_grid(config)
  names = [n for n, _, _ in grid]
  assert len(set(names)) == len(names)
  assert {'full', 'no_di_no_bato', 'di_only', 'bato_only', 'no_gtg', 'selections_3', 'k1_half', 'k2_half'} <= set(names)
  assert {f'guidance_{g}' for g in ('T_i', 'T_s1', 'T_s2')} <= set(names)
  # Official formulation: Q_bal is T_s2 itself (no residual cross-attention), so no guidance_Q_bal; paper: there is.
  assert config.model.formulation == 'official' and 'guidance_Q_bal' not in names
  paper = tiny_config()
  paper.model.formulation = 'paper'
  assert 'guidance_Q_bal' in [n for n, _, _ in ablation.default_grid(paper)]
  assert {'decoder_2', 'decoder_6'} <= set(names)
  assert {t for _, t, _ in grid} == {'all', '4', '5', '6', '7', '8', '9'}
  # The paper's numbering: Table 5 = the guidance of BATO (DI diagnostics), Table 6 = GTG (BATO diagnostics).
  tables = {n: t for n, t, _ in grid}
  assert tables['guidance_T_s2'] == '5' and tables['no_gtg'] == '6'
  seen = set()
  for name, _, overrides in grid:
    c = runner.setting_config(config, overrides, steps=2, name=name)  # validates
    key = repr(sorted(c.model.to_dict().items()))
    assert key not in seen, f'{name} repeats another setting'
    seen.add(key)
  three = runner.setting_config(config, next(o for n, _, o in grid if n == 'selections_3'))
  assert tuple(three.model.di.selection_ks) == (24, 18, 12)
  with pytest.raises(ConfigError, match='no field'):
    runner.setting_config(config, {'model.no_such': 1})
  with pytest.raises(ConfigError, match='bato.guidance'):
    runner.setting_config(config, {'model.bato.guidance': 'nope'})


def test_ablation_cli_only_add_and_table(tmp_path, capsys):
  fake = Fake()
  wd = str(tmp_path / 'abl')
  listed = ablation.main(ARGS + ['--workdir', wd, '--list'])
  assert [s[0] for s in listed['settings']][0] == 'full' and not os.path.exists(wd)
  out = ablation.main(
    ARGS
    + ['--workdir', wd, '--steps', '1', '--only', 'full', 'decoder_6', 'extra', '--quiet']
    + ['--add', 'extra:loss.detection_weight_scale=0.5,model.dn.mode=none'],
    **vars_of(fake),
  )
  assert [n for n, _ in fake.trained] == ['full', 'decoder_6', 'extra']
  extra = dict(fake.trained)['extra']
  assert extra.loss.detection_weight_scale == 0.5 and extra.model.dn.mode == 'none'
  rows = {r['name']: r for r in out['rows']}
  assert rows['decoder_6']['AP_mask'] == 30.0 - 18 and rows['full']['AP_mask'] == 30.0 - 9
  line = next(ln for ln in out['table'].splitlines() if ln.startswith('| decoder_6 '))
  assert line.endswith('| +0.0 | -9.0 |') and '| 9 |' in line  # Table 9, delta mask vs full
  assert '| extra | added |' in out['table']
  with pytest.raises(SystemExit):
    ablation.main(ARGS + ['--workdir', wd, '--only', 'nope', '--quiet'], **vars_of(fake))
  assert 'no setting named' in capsys.readouterr().err


def test_plots(tmp_path):
  per_layer = [
    {'layer': 'initial', **_metrics(10, 20)},
    {'layer': 'decoder_0', **_metrics(20, 25)},
    {'layer': 'decoder_1', **_metrics(30, 27)},
  ]
  a = _png(plot_per_layer(per_layer, str(tmp_path / 'a.png'), title='t'))
  box_only = [{'layer': e['layer'], 'bbox': e['bbox']} for e in per_layer]
  _png(plot_per_layer(box_only, str(tmp_path / 'b.png')))
  rows = [{'name': 'x', 'AP_box': 1.0, 'AP_mask': math.nan}, {'name': 'y', 'AP_box': 2.0, 'AP_mask': 1.0}]
  _png(plot_settings(rows, str(tmp_path / 'sub' / 'c.png')))
  assert a[0] > a[1]


def test_eval_cli_per_layer_writes_the_figure(tmp_path, monkeypatch):
  spec = importlib.util.spec_from_file_location('eval_cli', os.path.join(REPO, 'eval.py'))
  cli = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cli)
  step_dir = tmp_path / 'run' / 'checkpoints' / '5'
  monkeypatch.setattr(ckpt_lib, 'resolve_checkpoint', lambda **kw: (str(step_dir), 5))
  monkeypatch.setattr(ckpt_lib, 'restore_variables', lambda config, d: {'params': {}})
  per_layer = [{'layer': n, **_metrics(i, i)} for i, n in enumerate(evaluator.layer_names(4))]
  monkeypatch.setattr(evaluator, 'evaluate', lambda config, v, **kw: {**per_layer[-1], 'per_layer': per_layer})
  monkeypatch.setattr('dimaskdino_jax.data.prepare.ensure_shapes_dataset', lambda *a, **k: None)
  cli.main(ARGS + ['--workdir', str(tmp_path / 'run'), '--per-layer', '--quiet'])
  _png(tmp_path / 'run' / 'eval' / cli.PER_LAYER_PLOT)
  cli.main(ARGS + ['--workdir', str(tmp_path / 'run2'), '--quiet'])
  assert not (tmp_path / 'run2' / 'eval' / cli.PER_LAYER_PLOT).exists()
