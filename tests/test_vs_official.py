"""benchmarks/vs_official.py's interleaved training-step timing (`--interleave`), with stand-in workers: the
serve protocol of `train_worker` and the turns of `run_interleaved` (no torch, no official code)."""

import json
import os
import subprocess
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

import vs_official as vo  # noqa: E402

# A worker process: train_worker with a stepper that records each step's side in a shared file.
FAKE_WORKER = """
import json, sys, time, types
sys.path.insert(0, {bench!r})
import vs_official as vo
name, record = sys.argv[1], sys.argv[2]
count = [0]
def stepper(args):
  def step():
    count[0] += 1
    with open(record, 'a') as f:
      f.write(name + '\\n')
    time.sleep(0.01)
    return float(count[0])
  return step, lambda: {{'side': name}}
print('some chatter before the set-up ends', flush=True)
res = vo.train_worker(stepper, types.SimpleNamespace(serve='--serve' in sys.argv, runs=2))
res['peak_rss_mib'] = 1.0
print('RESULT ' + json.dumps(res), flush=True)
"""


def _fake_command(record):
  code = FAKE_WORKER.format(bench=os.path.join(ROOT, 'benchmarks'))
  return lambda name, args: [sys.executable, '-c', code, name, str(record)]


def test_train_worker_runs_warm_up_and_runs_without_serve(tmp_path):
  record = tmp_path / 'steps'
  out = subprocess.run(_fake_command(record)('solo', None), capture_output=True, text=True, check=True)
  res = json.loads(out.stdout.splitlines()[-1][len('RESULT ') :])
  assert res['losses'] == [1.0, 2.0, 3.0]  # one warm-up run and --runs (2) timed ones
  assert len(res['runs_ms']) == 3 and res['side'] == 'solo'


def test_run_interleaved_takes_turns(tmp_path, monkeypatch):
  record = tmp_path / 'steps'
  monkeypatch.setattr(vo, 'worker_command', _fake_command(record))
  args = types.SimpleNamespace(runs=3)
  out = vo.run_interleaved(['official_train', 'ours_train'], args)
  steps = record.read_text().split()
  # Each side's warm-up (one after the other), then three rounds of one step each, official first.
  assert steps == ['official_train', 'ours_train'] + ['official_train', 'ours_train'] * 3
  for name in ('official_train', 'ours_train'):
    assert out[name]['side'] == name and out[name]['interleaved']
    assert out[name]['losses'] == [1.0, 2.0, 3.0, 4.0]
    assert len(out[name]['runs_ms']) == 4


def test_run_interleaved_reports_a_worker_that_dies(tmp_path, monkeypatch):
  monkeypatch.setattr(
    vo, 'worker_command', lambda name, args: [sys.executable, '-c', 'import sys; sys.stderr.write("boom"); sys.exit(3)']
  )
  with pytest.raises(SystemExit, match='official_train failed'):
    vo.run_interleaved(['official_train', 'ours_train'], types.SimpleNamespace(runs=1))
