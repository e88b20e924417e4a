"""The schedule rescaling that `python -m dimaskdino_jax.demo --steps N` uses (the full demo is `make demo`, too slow
for the suite)."""

import os

from dimaskdino_jax.analysis.runner import set_num_steps
from dimaskdino_jax.config import load_config


def test_set_num_steps_moves_lr_drops_proportionally():
  c = load_config('configs/shapes.py')
  n, drops = c.train.num_steps, tuple(c.optim.lr_drop_steps)
  set_num_steps(c, 2 * n)
  assert c.train.num_steps == 2 * n
  assert tuple(c.optim.lr_drop_steps) == tuple(2 * d for d in drops)


def test_split_cpu_adds_a_device_count_unless_one_is_set(monkeypatch):
  from dimaskdino_jax.demo import split_cpu

  monkeypatch.setenv('XLA_FLAGS', '--a=1')
  split_cpu(2)
  assert os.environ['XLA_FLAGS'] == '--a=1 --xla_force_host_platform_device_count=2'
  split_cpu(4)  # a count already there wins
  assert os.environ['XLA_FLAGS'] == '--a=1 --xla_force_host_platform_device_count=2'
  monkeypatch.setenv('XLA_FLAGS', '--a=1')
  split_cpu(1)
  assert os.environ['XLA_FLAGS'] == '--a=1'


def test_demo_flags_apply_config_overrides_then_steps(capsys):
  import pytest

  from dimaskdino_jax.demo import parse_args

  base = load_config('configs/shapes.py')
  n, drops = base.train.num_steps, tuple(base.optim.lr_drop_steps)
  args, c = parse_args(
    ['--workdir', 'W', '--steps', str(n // 2), '--config.optim.lr=2e-3', '--config.model.dn.num', '7']
  )
  assert args.workdir == 'W'
  assert c.optim.lr == 2e-3 and c.model.dn.num == 7
  assert c.train.num_steps == n // 2
  assert tuple(c.optim.lr_drop_steps) == tuple(max(1, int(d * (n // 2) / n)) for d in drops)
  args, c = parse_args([])
  assert c.optim.lr == base.optim.lr and c.train.num_steps == n
  assert args.cpu_devices == 1  # one host device unless asked (BENCHMARKS.md, session 23)
  with pytest.raises(SystemExit):
    parse_args(['--config.optim.no_such_field=1'])
  assert 'optim.no_such_field' in capsys.readouterr().err  # the error names the field


def test_two_host_devices_only_where_host_callbacks_are_small():
  # Two host devices on two cores deadlock in jax 0.10.2 when a host callback's input exceeds ~100 KiB
  # (docs/jax_notes.md). The demo's config stays below CALLBACK_SAFE_BYTES and keeps two devices; the R50 config
  # (point losses with a host top-k over 37,632 candidates per mask) gets one on two cores, two on four.
  from dimaskdino_jax.demo import cpu_devices_for
  from dimaskdino_jax.training.sharding import CALLBACK_SAFE_BYTES, host_callback_bytes

  shapes = load_config('configs/shapes.py')
  # 7 matched sets x 4 images per device x 60 queries x 8 GT x 4 bytes: the matching costs (the stacked array the
  # callback receives, (7, 8, 60, 8) float32 for the batch of 8 on one device, printed 2026-12-07); no top-k.
  assert host_callback_bytes(shapes, 2) == 7 * 4 * 60 * 8 * 4 <= CALLBACK_SAFE_BYTES
  assert cpu_devices_for(shapes, 2, 2) == (2, None)
  r50 = load_config('configs/dimaskdino_r50_coco.py')
  assert host_callback_bytes(r50, 2) > 100 * CALLBACK_SAFE_BYTES
  devices, why = cpu_devices_for(r50, 2, 2)
  assert devices == 1 and 'deadlock' in why and 'docs/jax_notes.md' in why
  assert cpu_devices_for(r50, 2, 4) == (2, None)  # more cores than devices: a free pool thread
  assert cpu_devices_for(r50, 1, 2) == (1, None)
  shapes.data.max_instances = 100  # larger GT sets make the matching costs too large as well
  assert cpu_devices_for(shapes, 2, 2)[0] == 1


def test_the_trainer_warns_where_host_callbacks_may_deadlock():
  # sharding.callback_deadlock_warning on a stand-in mesh (the test process has one CPU device): two CPU devices of
  # this process on two cores warn for the R50 config, not for the shapes config, not on four cores, not on a GPU.
  from types import SimpleNamespace

  import jax
  import numpy as np

  from dimaskdino_jax.training.sharding import callback_deadlock_warning

  def mesh(platform, n=2):
    devices = [SimpleNamespace(process_index=jax.process_index(), platform=platform) for _ in range(n)]
    return SimpleNamespace(devices=np.array(devices, dtype=object), shape={'data': n, 'model': 1})

  r50, shapes = load_config('configs/dimaskdino_r50_coco.py'), load_config('configs/shapes.py')
  text = callback_deadlock_warning(r50, mesh('cpu'), cpu_count=2)
  assert text and 'deadlock' in text and 'docs/jax_notes.md' in text
  assert callback_deadlock_warning(shapes, mesh('cpu'), cpu_count=2) is None
  assert callback_deadlock_warning(r50, mesh('cpu'), cpu_count=4) is None
  assert callback_deadlock_warning(r50, mesh('gpu'), cpu_count=2) is None
  assert callback_deadlock_warning(r50, mesh('cpu', 1), cpu_count=1) is None


def test_the_demo_applies_the_callback_guard_to_a_requested_device_count(monkeypatch, capsys):
  # main() decides the host devices before jax starts; a stand-in split_cpu stops it there. Asked for two devices on
  # two cores, the R50 config (large host callbacks) gets one with the reason printed; the shapes config gets two.
  import pytest

  from dimaskdino_jax import demo

  class Stop(Exception):
    pass

  chosen = []

  def split_cpu(n):
    chosen.append(n)
    raise Stop

  monkeypatch.setattr(demo, 'split_cpu', split_cpu)
  monkeypatch.setattr(demo.os, 'cpu_count', lambda: 2)
  for config, expected in (('configs/dimaskdino_r50_coco.py', 1), ('configs/shapes.py', 2)):
    with pytest.raises(Stop):
      demo.main(['--config', config, '--cpu-devices', '2'])
    assert chosen[-1] == expected
  assert 'one host device instead of 2' in capsys.readouterr().out
  with pytest.raises(Stop):
    demo.main([])
  assert chosen[-1] == 1  # the default
