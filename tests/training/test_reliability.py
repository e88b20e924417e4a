"""Crash safety, preemption, the NaN guard, failing writes and config / checkpoint mismatches (issue 9).

Determinism relied on (and checked bitwise here): same jax/jaxlib, same XLA_FLAGS (tests/conftest.py), same CPU
device count, in this process and in train.py subprocesses. A resumed run must equal the uninterrupted reference.
"""

import errno
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dimaskdino_jax.data.pipeline import make_train_iterator
from dimaskdino_jax.modeling.model import build_model
from dimaskdino_jax.training import checkpoint as ckpt_lib
from dimaskdino_jax.training import optimizer as optim_lib
from dimaskdino_jax.training import trainer
from dimaskdino_jax.training.writers import read_metrics
from tests.tiny import prepared_shapes
from tests.training.reliability_config import config_for

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 6


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return prepared_shapes(tmp_path_factory, seed=1, num_train=24, num_val=4)


@pytest.fixture(scope='module')
def reference(data_dir, tmp_path_factory):
  """An uninterrupted run of STEPS steps: its final state and loss curve."""
  wd = str(tmp_path_factory.mktemp('reference'))
  state = trainer.train(config_for(data_dir, STEPS), wd, verbose=False)
  return {'workdir': wd, 'state': state, 'losses': losses(wd)}


def losses(workdir):
  return {r['step']: r['loss'] for r in read_metrics(os.path.join(workdir, 'metrics.jsonl'))}


def assert_bitwise(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path), strict=True)


def abstract_train_state(config):
  model = build_model(config)
  shape = (config.train.batch_size, config.data.image_size, config.data.image_size, 3)
  tx = optim_lib.build_optimizer(config, trainer.abstract_params(model, shape))
  return model, tx, jax.eval_shape(lambda: trainer.init_state(config, model, tx, shape))


def restore_step(workdir, config, step):
  _, _, shape = abstract_train_state(config)
  with ckpt_lib.Checkpointer(workdir, max_to_keep=None) as ckpt:
    return ckpt.restore(step, ckpt_lib.abstract_state(shape))


def complete_steps(workdir):
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


class Batches:
  """Wraps the train iterator; hook(n, batch) sees batch n (1-based, = the step of a fresh run) before it is used."""

  def __init__(self, config, hook):
    self._it = make_train_iterator(config)
    self._hook = hook
    self.n = 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._it)
    self.n += 1
    return self._hook(self.n, batch)

  def get_state(self):
    return self._it.get_state()

  def set_state(self, state):
    self._it.set_state(state)


def nan_boxes(steps):
  def hook(n, batch):
    if n in steps:
      batch = {**batch, 'boxes': np.full_like(batch['boxes'], np.nan)}
    return batch

  return hook


# ----------------------------------------------------------------------------------------------- the NaN guard
def test_nonfinite_update_is_skipped_inside_the_step(data_dir, reference):
  """The jitted step with a NaN batch: params and optimizer state come back bitwise unchanged, the skip counted."""
  config = config_for(data_dir, STEPS)
  model, tx, _ = abstract_train_state(config)
  restored = restore_step(reference['workdir'], config, 2)['state']
  before = jax.tree.map(np.asarray, {k: restored[k] for k in ('params', 'opt_state')})
  batch = next(make_train_iterator(config))
  batch['boxes'] = np.full_like(batch['boxes'], np.nan)
  step_fn = trainer.compiled_train_step(config, model, tx)
  state, scalars = step_fn(restored, trainer.batch_to_device(batch))
  assert_bitwise({k: state[k] for k in ('params', 'opt_state')}, before)
  assert int(state['step']) == 3 and float(scalars['skipped']) == 1.0 and not np.isfinite(float(scalars['loss']))
  assert int(state['nonfinite']['consecutive']) == 1 and int(state['nonfinite']['total']) == 1
  assert 'loss' in trainer.nonfinite_names(scalars)


def test_one_nonfinite_step_is_skipped_and_counted(data_dir, tmp_path):
  wd = str(tmp_path / 'run')
  config = config_for(data_dir, 4, **{'train.checkpoint_every': 1, 'train.max_consecutive_nonfinite': 2})
  state = trainer.train(config, wd, data_iterator=Batches(config, nan_boxes({2})), verbose=False)
  records = {r['step']: r for r in read_metrics(wd)}
  assert [records[s]['skipped'] for s in (1, 2, 3, 4)] == [0.0, 1.0, 0.0, 0.0]
  assert not np.isfinite(records[2]['loss']) and np.isfinite(records[3]['loss'])
  assert records[4]['skipped_total'] == 1 and int(state['nonfinite']['total']) == 1
  assert int(state['nonfinite']['consecutive']) == 0 and int(state['step']) == 4
  assert complete_steps(wd) == [1, 3, 4]  # no periodic checkpoint right after a skipped update


def test_nonfinite_streak_stops_the_run_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
  wd = str(tmp_path / 'run')
  config = config_for(data_dir, STEPS, **{'train.checkpoint_every': 1, 'train.max_consecutive_nonfinite': 2})
  with pytest.raises(trainer.NonFiniteError) as e:
    trainer.train(config, wd, data_iterator=Batches(config, nan_boxes({2, 3})), verbose=False)
  msg = str(e.value)
  assert 'stopped at step 3' in msg and 'steps 2-3' in msg and 'max_consecutive_nonfinite = 2' in msg
  assert re.search(r'step 2: .*\bloss\b', msg) and re.search(r'step 3: .*loss_\w+', msg), msg
  assert complete_steps(wd) == [1] and os.path.join(wd, 'checkpoints', '1') in msg


# ------------------------------------------------------------------------------------------------- preemption
def test_sigterm_saves_the_current_step_and_resume_is_exact(data_dir, reference, tmp_path):
  wd = str(tmp_path / 'run')
  config = config_for(data_dir, STEPS, **{'train.checkpoint_every': 100})
  previous = signal.getsignal(signal.SIGTERM)

  def preempt(n, batch):
    if n == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return batch

  with pytest.raises(trainer.TrainingInterrupted) as e:
    trainer.train(config, wd, data_iterator=Batches(config, preempt), verbose=False)
  assert e.value.step == 3 and e.value.signum == signal.SIGTERM
  assert 'SIGTERM' in str(e.value) and 'Rerun the same command' in str(e.value)
  assert complete_steps(wd) == [3] and signal.getsignal(signal.SIGTERM) is previous
  state = trainer.train(config, wd, verbose=False)
  assert_bitwise(state, reference['state'])
  assert losses(wd) == reference['losses']


# ----------------------------------------------------------------------------------------- disks and workdirs
def test_unwritable_or_full_workdir_fails_at_start(data_dir, tmp_path, monkeypatch):
  config = config_for(data_dir, STEPS)
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  with pytest.raises(
    ckpt_lib.CheckpointError, match=re.escape(str(blocker / 'run' / 'checkpoints')) + '.*not writable'
  ):
    trainer.train(config, str(blocker / 'run'), verbose=False)

  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(ckpt_lib.shutil, 'disk_usage', lambda p: usage._replace(free=2**20))
  wd = tmp_path / 'full'
  with pytest.raises(ckpt_lib.CheckpointError, match=r'checkpoints: only 1.0 MiB free, one checkpoint needs about'):
    trainer.train(config, str(wd), verbose=False)
  assert os.listdir(wd / 'checkpoints') == []


def test_failed_checkpoint_write_leaves_no_partial_checkpoint(data_dir, reference, tmp_path, monkeypatch):
  wd = str(tmp_path / 'run')
  config = config_for(data_dir, STEPS)
  real_save = ckpt_lib.DataStateHandler.save

  def full_disk_at_step_4(self, directory, args):
    if str(directory).split(os.sep)[-2].startswith('4.'):  # WORKDIR/checkpoints/4.orbax-checkpoint-tmp/data...
      raise OSError(errno.ENOSPC, 'No space left on device', str(directory))
    return real_save(self, directory, args)

  monkeypatch.setattr(ckpt_lib.DataStateHandler, 'save', full_disk_at_step_4)
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    trainer.train(config, wd, verbose=False)
  msg = str(e.value)
  assert 'writing checkpoint 4 failed' in msg and 'No space left on device' in msg, msg
  assert 'newest complete checkpoint is step 2' in msg
  assert sorted(os.listdir(os.path.join(wd, 'checkpoints'))) == ['2']  # the partial write is gone
  monkeypatch.undo()
  state = trainer.train(config, wd, verbose=False)  # resumes from step 2
  assert_bitwise(state, reference['state'])


# ------------------------------------------------------------------------------------------------- mismatches
def test_config_checkpoint_mismatch_lists_the_differences(data_dir, reference, tmp_path):
  wd = str(tmp_path / 'run')
  shutil.copytree(reference['workdir'], wd)
  saved = open(os.path.join(wd, 'config.json')).read()
  # The data iterator of the matching config: with the config's own, the dataset check (5 classes vs the dataset's
  # 3, tests/data) would stop the run before the checkpoint is compared.
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
    it = make_train_iterator(config_for(data_dir, STEPS))
    trainer.train(config_for(data_dir, STEPS, **{'model.num_classes': 5}), wd, data_iterator=it, verbose=False)
  msg = str(e.value)
  assert re.search(r'params/\S+/bias: checkpoint \(3,\) vs expected \(5,\)', msg), msg
  assert 'model.num_classes: checkpoint 3, config 5' in msg and os.path.join(wd, 'checkpoints', '6', 'state') in msg

  with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
    trainer.train(config_for(data_dir, STEPS, **{'model.encoder.num_layers': 1}), wd, verbose=False)
  msg = str(e.value)
  assert re.search(r'params/\S*encoder\S*: in the checkpoint \(.*\), not expected', msg), msg
  assert 'model.encoder.num_layers: checkpoint 2, config 1' in msg
  assert open(os.path.join(wd, 'config.json')).read() == saved  # the run's config.json is left as it was


# -------------------------------------------------------------------------------------------------- kill -9
def _wait_for(predicate, proc, what, timeout=400):
  end = time.time() + timeout
  while time.time() < end:
    if predicate():
      return
    if proc.poll() is not None:
      out, err = proc.communicate()
      raise AssertionError(f'train.py exited ({proc.returncode}) before {what}:\n{out[-2000:]}\n{err[-4000:]}')
    time.sleep(0.02)
  proc.kill()
  raise AssertionError(f'timed out waiting for {what}')


def _train_cmd(data_dir, wd):
  config = f'tests/training/reliability_config.py:{data_dir}'
  return [sys.executable, 'train.py', '--config', config, '--workdir', wd]


def test_kill9_at_random_moments_then_resume_equals_uninterrupted(data_dir, reference, tmp_path, capsys):
  """SIGKILL train.py after a seeded random number of steps, then in the middle of a checkpoint write, then run the
  same training to the end: the final state and every logged loss equal the uninterrupted run, bitwise.

  The last run is `trainer.train` in this process (what train.py calls, with the same config and workdir): it
  shares the compiled step with the reference run, which saves one subprocess compile (~40 s) of the suite."""
  rng = random.Random(9)
  wd = str(tmp_path / 'run')
  env = {**os.environ, 'PYTHONPATH': REPO + os.pathsep + os.environ.get('PYTHONPATH', '')}
  cmd = _train_cmd(data_dir, wd)
  metrics = os.path.join(wd, 'metrics.jsonl')

  def logged_steps():
    return len(read_metrics(metrics)) if os.path.exists(metrics) else 0

  # 1. SIGKILL after 1-3 logged steps (whatever step it has reached by then).
  after = rng.randint(1, 3)
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for(lambda: logged_steps() >= after, proc, f'{after} logged steps')
  proc.kill()
  proc.communicate()
  first = complete_steps(wd)

  # 2. SIGKILL while a checkpoint is being written (the test hook holds the temporary directory open 4 s).
  ckpts = os.path.join(wd, 'checkpoints')

  def writing():
    return [n for n in os.listdir(ckpts) if ckpt_lib.TMP_SUFFIX in n] if os.path.isdir(ckpts) else []

  proc = subprocess.Popen(
    cmd,
    cwd=REPO,
    env={**env, ckpt_lib.SAVE_DELAY_ENV: '4'},
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  started = time.time()

  def new_writes():  # a stale temporary directory left by run 1 does not count
    return [n for n in writing() if os.stat(os.path.join(ckpts, n)).st_mtime >= started - 1]

  _wait_for(lambda: bool(new_writes()), proc, 'a checkpoint write')
  time.sleep(rng.uniform(0.0, 1.0))
  torn = new_writes()
  proc.kill()
  proc.communicate()
  torn_step = int(torn[0].split('.')[0])
  second = complete_steps(wd)
  assert torn_step not in second and torn_step > max(first, default=0), (first, torn, second)
  assert os.path.isdir(os.path.join(ckpts, torn[0]))  # killed mid-write: the partial directory is still there

  # 3. The same training again, to the end.
  capsys.readouterr()
  final = trainer.train(config_for(data_dir, STEPS), wd, verbose=True)
  out = capsys.readouterr().out
  resumed_from = max(second, default=0)
  if resumed_from:
    assert f'Resumed from {ckpts} at step {resumed_from}' in out, out[-2000:]
  assert complete_steps(wd)[-1] == STEPS and not writing()
  assert_bitwise(final, reference['state'])
  restored = restore_step(wd, config_for(data_dir, STEPS), STEPS)['state']
  assert_bitwise(restored, reference['state'])
  assert losses(wd) == reference['losses']  # the same loss curve, step by step


def test_train_py_reports_training_errors_without_traceback(data_dir, tmp_path):
  """train.py prints CheckpointError / NonFiniteError / mismatches as one 'error:' message and exits with 1."""
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a directory')
  env = {**os.environ, 'PYTHONPATH': REPO + os.pathsep + os.environ.get('PYTHONPATH', '')}
  cmd = _train_cmd(data_dir, str(blocker / 'run'))
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1 and 'error: ' in proc.stderr and 'not writable' in proc.stderr, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr


# --------------------------------------------------------------------------------------- eval on a live workdir
def test_eval_of_a_live_workdir_reads_a_complete_checkpoint(data_dir, reference, tmp_path, monkeypatch, caplog):
  """eval.py's restore: a write in progress is not a candidate; a checkpoint deleted mid-read (keep-K rotation by the
  trainer) is replaced by the newest complete one; no 'Metadata file does not exist' warning on the item."""
  import importlib.util

  spec = importlib.util.spec_from_file_location('eval_cli', os.path.join(REPO, 'eval.py'))
  cli = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cli)
  wd = tmp_path / 'run'
  shutil.copytree(reference['workdir'], wd)
  shutil.copytree(wd / 'checkpoints' / '6', wd / 'checkpoints' / f'8{ckpt_lib.TMP_SUFFIX}')  # a write in progress
  real_restore = ckpt_lib.restore_variables
  calls = []

  def restore_while_trainer_deletes(config, step_dir):
    calls.append(step_dir)
    if len(calls) == 1:
      shutil.rmtree(step_dir)  # the trainer's keep-K rotation, mid-read
    return real_restore(config, step_dir)

  monkeypatch.setattr(ckpt_lib, 'restore_variables', restore_while_trainer_deletes)
  args = type('Args', (), {'workdir': str(wd), 'checkpoint': None})()
  config = config_for(data_dir, STEPS)
  with caplog.at_level('WARNING'):
    step_dir, step, variables = cli.restore_newest(ckpt_lib, config, args, verbose=False)
  assert calls == [str(wd / 'checkpoints' / '6'), str(wd / 'checkpoints' / '4')] and step == 4
  expected = restore_step(reference['workdir'], config, 4)['state']
  assert_bitwise(variables['params'], expected['params'])
  assert 'Metadata file does not exist' not in caplog.text


def test_config_validates_the_reliability_fields():
  from dimaskdino_jax.config import ConfigError
  from tests.tiny import tiny_config

  assert tiny_config().train.max_consecutive_nonfinite == 5
  for field, bad in (('max_consecutive_nonfinite', 0), ('checkpoint_every', 0)):
    with pytest.raises(ConfigError, match=f'train.{field}: must be an integer >= 1'):
      tiny_config(**{f'train.{field}': bad})
