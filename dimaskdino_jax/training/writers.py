"""Metric logging without TensorFlow (clu.metric_writers needs it): JSONL + TensorBoard (tensorboardX) + tqdm.

    writer = MetricWriter(workdir)                    # WORKDIR/metrics.jsonl, WORKDIR/tensorboard/events.out.*
    writer.write_scalars(step, {'loss': loss, 'lr': lr})
    with ProgressBar(total=num_steps, initial=start_step) as bar:
      bar.update(step, loss=loss)                      # shows loss, steps/s and the ETA

Only process 0 writes (jax.process_index() == 0); elsewhere every call is a no-op. metrics.jsonl has one JSON object
per `write_scalars` call: {"step": 100, "loss": 1.23, ...}; the evaluation during training (periodic_eval.py) adds
records without "loss": {"step": 1000, "eval/bbox_AP": ..., "eval/best": ...}. When a run resumes from a checkpoint
at step S, pass `start_step=S`: lines (and TensorBoard events) after S, written by the interrupted run, are dropped.
"""

import json
import math
import os
from collections.abc import Mapping

import jax
import numpy as np

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'


def _is_main_process() -> bool:
  return jax.process_index() == 0


def _scalar(name, value):
  """A python float / int from a python, numpy or jax scalar (one element)."""
  arr = np.asarray(value)
  if arr.size != 1:
    raise ValueError(f'metric {name!r}: expected a scalar, got shape {arr.shape}')
  v = arr.reshape(()).item()
  if isinstance(v, bool):
    return int(v)
  if not isinstance(v, int | float):
    raise ValueError(f'metric {name!r}: expected a number, got {type(v).__name__}')
  return v


def read_metrics(path) -> list[dict]:
  """The records of a metrics.jsonl file (a workdir or the file itself)."""
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_FILE)
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class MetricWriter:
  """Writes scalars to WORKDIR/metrics.jsonl and TensorBoard event files (WORKDIR/tensorboard).

  workdir: the run directory. tensorboard: also write event files. start_step: the step a resumed run starts from
  (later records of the interrupted run are dropped). enabled: default process 0 only.
  """

  def __init__(self, workdir, tensorboard: bool = True, start_step: int | None = None, enabled: bool | None = None):
    self.workdir = os.fspath(workdir)
    self.enabled = _is_main_process() if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(self.workdir, exist_ok=True)
    path = os.path.join(self.workdir, METRICS_FILE)
    if start_step is not None and os.path.exists(path):
      self._truncate_after(path, int(start_step))
    self._jsonl = open(path, 'a')
    if tensorboard:
      from tensorboardX import SummaryWriter

      purge = None if start_step is None else int(start_step) + 1
      self._tb = SummaryWriter(logdir=os.path.join(self.workdir, TENSORBOARD_DIR), purge_step=purge, flush_secs=30)

  @staticmethod
  def _truncate_after(path, step):
    with open(path) as f:
      lines = [line for line in f if line.strip()]
    keep = []
    for line in lines:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:  # a torn last line of a killed run
        continue
      if record.get('step', -1) <= step:
        keep.append(line if line.endswith('\n') else line + '\n')
    with open(path, 'w') as f:
      f.writelines(keep)

  def write_scalars(self, step: int, scalars: Mapping[str, object]):
    """One JSONL record {'step': step, **scalars} and one TensorBoard scalar per name."""
    if not self.enabled:
      return
    record = {'step': int(step)}
    for name, value in scalars.items():
      if name == 'step':
        raise ValueError("'step' is reserved in metrics.jsonl")
      record[str(name)] = _scalar(name, value)
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      for name, value in record.items():
        if name != 'step' and math.isfinite(value):
          self._tb.add_scalar(name, value, global_step=int(step))

  def write_texts(self, step: int, texts: Mapping[str, str]):
    """Text summaries (e.g. the config) to TensorBoard only."""
    if self.enabled and self._tb is not None:
      for name, text in texts.items():
        self._tb.add_text(name, str(text), global_step=int(step))

  def flush(self):
    if self._jsonl is not None:
      self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


class ProgressBar:
  """A tqdm bar over training steps showing the loss, steps/s and the ETA (process 0 only).

  total: the last step; initial: the step a (resumed) run starts from. `update(step, loss=..., **more)` moves the
  bar to `step` (absolute) and shows the given scalars.
  """

  def __init__(self, total: int, initial: int = 0, desc: str = 'train', enabled: bool | None = None, **tqdm_kwargs):
    self.enabled = _is_main_process() if enabled is None else enabled
    self._bar = None
    if self.enabled:
      from tqdm.auto import tqdm

      kwargs = dict(total=int(total), initial=int(initial), desc=desc, unit='step', dynamic_ncols=True, smoothing=0.1)
      kwargs.update(tqdm_kwargs)
      self._bar = tqdm(**kwargs)

  def update(self, step: int, loss=None, **scalars):
    if self._bar is None:
      return
    shown = {} if loss is None else {'loss': f'{_scalar("loss", loss):.4g}'}
    shown.update({k: f'{_scalar(k, v):.4g}' for k, v in scalars.items()})
    if shown:
      self._bar.set_postfix(shown, refresh=False)
    self._bar.update(int(step) - self._bar.n)

  @property
  def steps_per_second(self) -> float | None:
    """tqdm's smoothed rate (None before the second update or when disabled)."""
    return None if self._bar is None else self._bar.format_dict.get('rate')

  def write(self, message: str):
    """Prints a line without breaking the bar."""
    if self._bar is not None:
      self._bar.write(message)

  def close(self):
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
