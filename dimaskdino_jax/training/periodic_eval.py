"""Evaluation during training: every `train.eval_every` steps, COCO AP on the val split and the best checkpoint.

    periodic = PeriodicEvaluation(config, workdir, writer, restored_meta)   # checks the val split exists
    if periodic.due(step):
      periodic.run(step, state)        # AP to metrics.jsonl / TensorBoard; WORKDIR/best/STEP when it improved
    ckpt.save(step, state, metrics=periodic.checkpoint_meta())            # the best so far survives a resume

* The evaluation is `evaluation.evaluator.evaluate` (the jitted predict function, compiled once per canvas and
  reused) on `data.val_split`, or its first `train.eval_max_images` images (0 = `eval.max_images`). It reads the
  params, never writes them, draws no random numbers and has its own loader: the training result is the same with
  and without it (tests/training/test_periodic_eval.py compares the losses).
* metrics.jsonl gets one record per evaluation, without a 'loss' key: {'step', 'eval/bbox_AP', 'eval/bbox_AP50',
  'eval/bbox_AP75', ['eval/segm_AP', ...], 'eval/best', 'eval/best_step'}; the same scalars go to TensorBoard.
* The best value of `train.best_metric` ('segm/AP' by default; 'bbox/AP50', ...) and its step are kept in the meta
  item of every periodic checkpoint (`checkpoint_meta`), so a killed and resumed run goes on comparing with the
  best of the run so far. The best checkpoint ({'step', 'params', 'frozen_bn'}) is written to WORKDIR/best/STEP
  (the previous one is removed) and read by `eval.py --workdir WORKDIR --checkpoint best`.
* Several processes: every process evaluates its share of the images (the evaluator gathers them), and every
  process takes part in the best checkpoint's write; all of them get the same metrics, hence the same decision.
"""

import math
import os

import jax

from dimaskdino_jax.config import ConfigError
from dimaskdino_jax.training.checkpoint import BEST_DIR, Checkpointer

BEST_KEYS = ('best_metric', 'best_value', 'best_step')  # in the meta item of every periodic checkpoint


class PeriodicEvaluation:
  """The evaluation hook of one training run (module docstring). meta: the restored checkpoint's meta item (None for
  a fresh run). Raises ConfigError naming data.val_split when train.eval_every is set and the split is not prepared."""

  def __init__(self, config, workdir, writer, meta=None, verbose=True):
    t = config.train
    self.config, self.writer, self.verbose = config, writer, verbose
    self.every = int(t.get('eval_every', 0) or 0)
    self.num_steps = int(t.num_steps)
    self.metric = str(t.get('best_metric', 'segm/AP'))
    self.max_images = int(t.get('eval_max_images', 0) or 0) or None
    saved = (meta or {}).get('metrics', {})
    self.best = None  # {'value', 'step'} of train.best_metric
    if saved.get('best_metric') == self.metric and saved.get('best_step') is not None:
      self.best = {'value': float(saved['best_value']), 'step': int(saved['best_step'])}
    self.best_ckpt = None
    if self.every:
      check_eval_split(config)
      self.best_ckpt = Checkpointer(workdir, config, max_to_keep=1, subdir=BEST_DIR, write_config=False)

  def due(self, step: int) -> bool:
    """Every eval_every steps and at the last step (when evaluation is on)."""
    return bool(self.every) and (step % self.every == 0 or step == self.num_steps)

  def run(self, step: int, state) -> dict:
    """Evaluates the params of `state`, logs the AP, saves the best checkpoint when it improved; returns the
    metrics dict of the evaluator."""
    from dimaskdino_jax.evaluation.evaluator import evaluate

    variables = {'params': state['params'], 'frozen_bn': state['frozen_bn']}
    metrics = evaluate(self.config, variables, max_images=self.max_images, verbose=False)
    kind, _, name = self.metric.partition('/')
    if kind not in metrics:
      raise ConfigError(
        f'train.best_metric: {self.metric!r} was not computed (the val split has no {kind} ground truth); '
        f'use bbox/{name}'
      )
    value = float(metrics[kind][name])
    improved = not math.isnan(value) and (self.best is None or value > self.best['value'])
    if improved:
      self.best = {'value': value, 'step': int(step)}
      self.best_ckpt.save(step, {'step': state['step'], **variables}, metrics={self.metric: value})
    record = {f'eval/{t}_{n}': metrics[t][n] for t in ('bbox', 'segm') if t in metrics for n in ('AP', 'AP50', 'AP75')}
    if self.best is not None:
      record['eval/best'] = self.best['value']
      record['eval/best_step'] = self.best['step']
    self.writer.write_scalars(step, record)
    if self.verbose and jax.process_index() == 0:
      aps = ', '.join(f'{k[5:]} {v:.2f}' for k, v in record.items() if k.endswith('_AP'))
      best = f'best {self.metric} {self.best["value"]:.2f} at step {self.best["step"]}' if self.best else 'no best yet'
      print(f'step {step}: eval {aps}; {best}{" (saved)" if improved else ""}', flush=True)
    return metrics

  def checkpoint_meta(self) -> dict:
    """The best so far, for the meta item of a periodic checkpoint ({} before the first evaluation)."""
    if self.best is None:
      return {}
    return {'best_metric': self.metric, 'best_value': self.best['value'], 'best_step': self.best['step']}

  def wait_until_finished(self):
    if self.best_ckpt is not None:
      self.best_ckpt.wait_until_finished()

  def close(self):
    if self.best_ckpt is not None:
      self.best_ckpt.close()


def check_eval_split(config) -> None:
  """Raises ConfigError naming data.val_split when it is not prepared (checked before the first step)."""
  from dimaskdino_jax.data.tfds_builder import dataset_dir, is_prepared

  d = config.data
  if not is_prepared(d.data_dir, d.name, d.val_split):
    raise ConfigError(
      f'train.eval_every = {config.train.eval_every} evaluates data.val_split = {d.val_split!r}, but '
      f'{os.path.abspath(dataset_dir(d.data_dir, d.name, d.val_split))} is not a prepared split; prepare it with '
      'python -m dimaskdino_jax.data.prepare, choose another --config.data.val_split, or set train.eval_every=0'
    )
