"""Metric writers: parseable JSONL, TensorBoard event files (read back), resume truncation, process-0 gating, tqdm."""

import glob
import io
import json
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from dimaskdino_jax.training.writers import MetricWriter, ProgressBar, read_metrics


def read_events(logdir):
  """(tag, step, value) of every scalar in the TFRecord event files of logdir (parsed by hand, no TensorFlow)."""
  out = []
  for path in sorted(glob.glob(os.path.join(logdir, 'events.out.tfevents.*'))):
    data = open(path, 'rb').read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack('<Q', data[pos : pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
      pos += 12 + length + 4
      for v in event.summary.value:
        if v.HasField('simple_value'):
          out.append((v.tag, event.step, v.simple_value))
  return out


def test_jsonl_and_events(tmp_path):
  with MetricWriter(tmp_path) as w:
    w.write_scalars(10, {'loss': jnp.asarray(1.5), 'lr': np.float32(1e-4), 'num_gt': np.int64(7)})
    w.write_scalars(20, {'loss': 0.75, 'nan_loss': float('nan')})
    w.write_texts(20, {'config': 'lr: 1e-4'})
    with pytest.raises(ValueError, match='scalar'):
      w.write_scalars(30, {'loss': np.ones(3)})
  lines = open(tmp_path / 'metrics.jsonl').read().splitlines()
  assert len(lines) == 2
  records = [json.loads(line) for line in lines]
  assert records[0] == {'step': 10, 'loss': 1.5, 'lr': pytest.approx(1e-4), 'num_gt': 7}
  assert isinstance(records[0]['num_gt'], int)
  assert records[1]['step'] == 20 and records[1]['loss'] == 0.75 and np.isnan(records[1]['nan_loss'])
  again = read_metrics(tmp_path)
  assert again[0] == records[0] and again[1]['loss'] == 0.75 and np.isnan(again[1]['nan_loss'])

  events = read_events(tmp_path / 'tensorboard')
  assert ('loss', 10, 1.5) in events and ('loss', 20, 0.75) in events and ('num_gt', 10, 7.0) in events
  assert any(tag == 'lr' and step == 10 and value == pytest.approx(1e-4) for tag, step, value in events)
  assert not any(tag == 'nan_loss' for tag, _, _ in events)


def test_resume_drops_later_records(tmp_path):
  with MetricWriter(tmp_path, tensorboard=False) as w:
    for step in (10, 20, 30, 40):
      w.write_scalars(step, {'loss': step / 10})
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 50, "lo')  # a torn line of a killed run
  with MetricWriter(tmp_path, tensorboard=False, start_step=20) as w:
    w.write_scalars(30, {'loss': 9.0})
  assert [(r['step'], r['loss']) for r in read_metrics(tmp_path)] == [(10, 1.0), (20, 2.0), (30, 9.0)]


def test_disabled_writer_writes_nothing(tmp_path):
  with MetricWriter(tmp_path / 'run', enabled=False) as w:
    w.write_scalars(1, {'loss': 1.0})
  assert not os.path.exists(tmp_path / 'run')
  bar = ProgressBar(10, enabled=False)
  bar.update(5, loss=1.0)
  assert bar.steps_per_second is None


def test_progress_bar_shows_loss_rate_and_eta():
  out = io.StringIO()
  with ProgressBar(100, initial=10, file=out, mininterval=0) as bar:
    for step in range(11, 21):
      bar.update(step, loss=jnp.asarray(0.123456), lr=1e-4)
    assert bar._bar.n == 20
    assert bar.steps_per_second is not None and bar.steps_per_second > 0
  text = out.getvalue()
  assert '20/100' in text and 'loss=0.1235' in text and 'lr=0.0001' in text and 'step/s' in text
  assert '<' in text  # elapsed<remaining: the ETA
