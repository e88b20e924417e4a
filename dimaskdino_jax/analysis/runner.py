"""Train and evaluate a list of config settings, one sub-workdir each; resume-friendly; a JSON + markdown table.

    rows = run_settings(config, [('standard', {}), ('det_x0.1', {'loss.detection_weight_scale': 0.1})],
                        'runs/table3', steps=300)

Each setting is the base config with its overrides (dotted field -> value) applied, trained with
`training.trainer.train` in WORKDIR/<name> (which resumes from that directory's checkpoints after an interruption)
and evaluated with `evaluation.evaluator.evaluate` (metrics in WORKDIR/<name>/eval/metrics.json). A setting whose
WORKDIR/<name>/result.json exists with the same overrides and steps is not run again. steps: train.num_steps for
every setting (the lr drops move to the same fractions, as in the demo); None keeps the config's.
"""

import copy
import json
import math
import os
import time
from collections.abc import Callable, Sequence

from dimaskdino_jax.config import ConfigError, validate

RESULT_FILE = 'result.json'


def set_field(config, dotted: str, value) -> None:
  """config.<dotted> = value; ConfigError when the field does not exist."""
  *path, leaf = dotted.split('.')
  node = config
  for i, key in enumerate(path):
    if key not in node:
      raise ConfigError(f'setting {dotted}: no field {".".join(path[: i + 1])!r} in the config')
    node = node[key]
  if leaf not in node:
    raise ConfigError(f'setting {dotted}: no field {dotted!r} in the config')
  node[leaf] = value


def set_num_steps(config, steps: int) -> None:
  """train.num_steps = steps, with the lr drops moved to the same fractions of the new length."""
  scale = steps / config.train.num_steps
  config.optim.lr_drop_steps = tuple(max(1, int(s * scale)) for s in config.optim.lr_drop_steps)
  config.train.num_steps = int(steps)
  config.train.checkpoint_every = min(int(config.train.checkpoint_every), int(steps))
  config.train.log_every = min(int(config.train.log_every), int(steps))


def setting_config(config, overrides: dict, steps: int | None = None, name: str = 'setting'):
  """A validated copy of `config` with `overrides` applied (and train.num_steps = steps)."""
  c = copy.deepcopy(config)
  for dotted, value in overrides.items():
    set_field(c, dotted, value)
  if steps:
    set_num_steps(c, steps)
  validate(c, source=f'setting {name!r}')
  return c


def _jsonable(overrides: dict) -> dict:
  return json.loads(json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()}))


def _default_train(config, workdir, verbose):
  from dimaskdino_jax.training.trainer import train

  state = train(config, workdir, verbose=verbose)
  return {'params': state['params'], 'frozen_bn': state['frozen_bn']}


def _default_evaluate(config, variables, out_dir, max_images, verbose):
  from dimaskdino_jax.evaluation.evaluator import evaluate

  return evaluate(config, variables, out_dir=out_dir, max_images=max_images, verbose=verbose, num_visualize=0)


def run_settings(
  config,
  settings: Sequence[tuple[str, dict]],
  workdir: str,
  *,
  steps: int | None = None,
  max_images: int | None = None,
  verbose: bool = True,
  train_fn: Callable | None = None,
  evaluate_fn: Callable | None = None,
) -> list[dict]:
  """Runs every (name, overrides) setting (module docstring); returns one row per setting, in order:
  {'name', 'overrides', 'steps', 'AP_box', 'AP_mask', 'AP50_box', 'AP50_mask', 'metrics', 'train_s', 'eval_s'}.

  All configs are built and validated before anything trains, so a bad setting fails at once. train_fn(config,
  workdir, verbose) -> variables and evaluate_fn(config, variables, out_dir, max_images, verbose) -> metrics replace
  the trainer and evaluator (tests).
  """
  names = [n for n, _ in settings]
  if len(set(names)) != len(names):
    raise ValueError(f'setting names must be unique: {names}')
  for n in names:
    if not n or os.sep in n or n.startswith('.'):
      raise ValueError(f'setting name {n!r} must be a plain directory name')
  configs = [setting_config(config, o, steps, n) for n, o in settings]
  train_fn = train_fn or _default_train
  evaluate_fn = evaluate_fn or _default_evaluate
  os.makedirs(workdir, exist_ok=True)
  rows = []
  for (name, overrides), cfg in zip(settings, configs):
    sub = os.path.join(workdir, name)
    path = os.path.join(sub, RESULT_FILE)
    want = {'overrides': _jsonable(overrides), 'steps': int(cfg.train.num_steps)}
    if os.path.isfile(path):
      with open(path) as f:
        done = json.load(f)
      if {k: done.get(k) for k in want} == want:
        if verbose:
          print(
            f'[{name}] done before: AP box {done["AP_box"]:.2f}, AP mask {done["AP_mask"]:.2f} ({path})', flush=True
          )
        rows.append(done)
        continue
    if verbose:
      print(f'[{name}] training {cfg.train.num_steps} steps in {sub} with {overrides or "the base config"}', flush=True)
    t0 = time.time()
    variables = train_fn(cfg, sub, verbose)
    t1 = time.time()
    metrics = evaluate_fn(cfg, variables, os.path.join(sub, 'eval'), max_images, verbose)
    row = {
      'name': name,
      **want,
      'AP_box': float(metrics['bbox']['AP']),
      'AP_mask': float(metrics.get('segm', {}).get('AP', math.nan)),
      'AP50_box': float(metrics['bbox']['AP50']),
      'AP50_mask': float(metrics.get('segm', {}).get('AP50', math.nan)),
      'metrics': metrics,
      'train_s': round(t1 - t0, 1),
      'eval_s': round(time.time() - t1, 1),
    }
    os.makedirs(sub, exist_ok=True)
    with open(path + '.tmp', 'w') as f:
      json.dump(row, f, indent=2)
    os.replace(path + '.tmp', path)
    rows.append(row)
  return rows


def relative_drop(value: float, reference: float) -> float:
  """(reference - value) / reference in percent; NaN when the reference is 0 or NaN."""
  if not reference or math.isnan(reference) or math.isnan(value):
    return math.nan
  return 100.0 * (reference - value) / reference


def _fmt(v: float, signed: bool = False) -> str:
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return 'n/a'
  return f'{v:+.1f}' if signed else f'{v:.2f}'


def markdown_table(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
  out = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  out += ['| ' + ' | '.join(str(c) for c in line) + ' |' for line in lines]
  return '\n'.join(out)


def write_outputs(workdir: str, rows: list[dict], table: str, extra: dict | None = None, plot_title: str = '') -> dict:
  """WORKDIR/results.json (rows without the full metrics + extra), WORKDIR/table.md and WORKDIR/results.png."""
  from dimaskdino_jax.analysis.plots import plot_settings

  slim = [{k: v for k, v in r.items() if k != 'metrics'} for r in rows]
  paths = {
    'json': os.path.join(workdir, 'results.json'),
    'markdown': os.path.join(workdir, 'table.md'),
    'plot': os.path.join(workdir, 'results.png'),
  }
  with open(paths['json'], 'w') as f:
    json.dump({'rows': slim, **(extra or {})}, f, indent=2)
  with open(paths['markdown'], 'w') as f:
    f.write(table + '\n')
  plot_settings(rows, paths['plot'], plot_title)
  return paths


def base_parser(description: str):
  """The shared flags: --config, --workdir, --steps, --max-images, --quiet (plus --config.a.b=value overrides)."""
  import argparse

  parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', required=True, help='configs/NAME.py[:variant]')
  parser.add_argument('--workdir', required=True, help='one sub-directory per setting; results.json, table.md')
  parser.add_argument('--steps', type=int, default=0, help='training steps per setting (0 = the config value)')
  parser.add_argument('--max-images', type=int, default=None, help='evaluate the first N val images only')
  parser.add_argument('--quiet', action='store_true')
  return parser
