"""A checkpoint is data, never code: crafted pickles that would run code on load are refused and nothing runs."""

import os
import pickle

import numpy as np
import pytest

from dimaskdino_jax.convert import CheckpointError, UnsafePickleError, read_state_dict, safe_pickle


class WritesAFile:
  """Unpickling this calls open(path, 'w') (any callable could be named the same way, e.g. os.system)."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (open, (self.path, 'w'))


class RunsShell:
  def __reduce__(self):
    return (os.system, ('touch /tmp/should-never-exist',))


def test_crafted_pkl_is_refused_and_nothing_runs(tmp_path):
  marker = tmp_path / 'pwned'
  path = tmp_path / 'evil.pkl'
  with open(path, 'wb') as f:
    pickle.dump({'model': {'w': np.zeros(3, np.float32), 'x': WritesAFile(str(marker))}}, f)
  with pytest.raises(CheckpointError) as e:
    read_state_dict(path)
  assert str(path) in str(e.value) and 'io.open' in str(e.value)  # open is io.open
  assert not marker.exists()
  # The control: plain pickle.load of the same file does run the call (so the test can fail).
  with open(path, 'rb') as f:
    pickle.load(f)
  assert marker.exists()


def test_shell_command_refused(tmp_path):
  path = tmp_path / 'evil.pkl'
  with open(path, 'wb') as f:
    pickle.dump(RunsShell(), f)
  with pytest.raises(UnsafePickleError, match=r'posix\.system|os\.system'):
    safe_pickle.load(path)


def test_arrays_and_containers_load(tmp_path):
  from collections import OrderedDict

  obj = {'model': OrderedDict(a=np.arange(6, dtype=np.float32).reshape(2, 3), b=np.float64(2.5)), 'n': [1, (2, 'x')]}
  path = tmp_path / 'ok.pkl'
  for protocol in (2, pickle.HIGHEST_PROTOCOL):
    with open(path, 'wb') as f:
      pickle.dump(obj, f, protocol=protocol)
    back = safe_pickle.load(path)
    np.testing.assert_array_equal(back['model']['a'], obj['model']['a'])
    assert back['model']['b'] == 2.5 and back['n'] == [1, (2, 'x')]


def test_pth_uses_weights_only(tmp_path):
  """torch.load(weights_only=True): tensors load; a .pth whose pickle names a callable is refused, nothing runs."""
  torch = pytest.importorskip('torch')
  path = tmp_path / 'ok.pth'
  torch.save({'model': {'w': torch.arange(4.0).reshape(2, 2), 'h': torch.ones(2, dtype=torch.float16)}}, path)
  sd = read_state_dict(path)
  np.testing.assert_array_equal(sd['w'], np.arange(4.0, dtype=np.float32).reshape(2, 2))
  assert sd['h'].dtype == np.float32  # half -> float32
  marker = tmp_path / 'pwned'
  evil = tmp_path / 'evil.pth'
  torch.save({'w': torch.zeros(2), 'x': WritesAFile(str(marker))}, evil)
  with pytest.raises(CheckpointError, match='weights_only'):
    read_state_dict(evil)
  assert not marker.exists()
