"""Checkpoints: save -> restore round trip (state, grain iterator, meta), keep-last-K, latest step, device change."""

import json
import os
import subprocess
import sys
import textwrap

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from dimaskdino_jax.training.checkpoint import Checkpointer, abstract_state


def make_config(keep=2):
  c = ml_collections.ConfigDict()
  c.name = 'ckpt_test'
  c.train = ml_collections.ConfigDict({'keep_checkpoints': keep})
  return c


def make_state(seed=0):
  k = jax.random.key(seed)
  params = {'dense': {'kernel': jax.random.normal(k, (4, 6)), 'bias': jnp.arange(6.0)}, 'norm': {'scale': jnp.ones(6)}}
  tx = optax.adamw(1e-3)
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, opt_state, params)  # non-trivial moments and count
  return {'params': params, 'opt_state': opt_state, 'step': jnp.asarray(7 + seed, jnp.int32), 'rng': k}


def make_iterator(seed=3):
  return iter(grain.MapDataset.range(50).shuffle(seed=seed).map(lambda x: x * 10).to_iter_dataset())


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_with_iterator_and_meta(tmp_path):
  state = make_state()
  it = make_iterator()
  consumed = [next(it) for _ in range(5)]
  ckpt = Checkpointer(tmp_path, make_config())
  assert ckpt.latest_step() is None and ckpt.restore_latest(abstract_state(state)) is None
  assert ckpt.save(100, state, data=it, metrics={'loss': np.float32(1.5), 'ap': jnp.asarray(3.0)})
  assert not ckpt.save(100, state)  # the same step twice: no-op
  expected_next = [next(it) for _ in range(4)]  # what a resumed run must see
  ckpt.wait_until_finished()
  ckpt.close()

  config = json.load(open(tmp_path / 'config.json'))
  assert config['name'] == 'ckpt_test' and config['train']['keep_checkpoints'] == 2

  fresh = make_iterator()
  ckpt = Checkpointer(tmp_path, make_config())
  restored = ckpt.restore_latest(abstract_state(make_state(seed=1)), data_iterator=fresh)
  assert_trees_equal(restored['state'], state)
  assert isinstance(restored['state']['opt_state'][0], optax.ScaleByAdamState)  # structure from the abstract state
  assert restored['meta'] == {'step': 100, 'config_name': 'ckpt_test', 'metrics': {'loss': 1.5, 'ap': 3.0}}
  assert isinstance(restored['data'], dict)
  assert [next(fresh) for _ in range(4)] == expected_next
  assert len(set(consumed) | set(expected_next)) == 9


def test_bytes_data_state_and_no_data(tmp_path):
  state = make_state()
  with Checkpointer(tmp_path, max_to_keep=3, async_save=False) as ckpt:
    ckpt.save(1, state, data=b'{"pos": 3}')
    ckpt.save(2, state)
    assert ckpt.restore(1, abstract_state(state))['data'] == b'{"pos": 3}'
    assert ckpt.restore(2, abstract_state(state))['data'] is None
    with pytest.raises(FileNotFoundError, match='step 5'):
      ckpt.restore(5, abstract_state(state))


def test_keep_last_k_and_incomplete_checkpoints(tmp_path):
  state = make_state()
  ckpt = Checkpointer(tmp_path, make_config(keep=2))
  for step in (10, 20, 30, 40):
    state = {**state, 'step': jnp.asarray(step, jnp.int32)}
    ckpt.save(step, state, data={'i': step})
  ckpt.wait_until_finished()
  assert ckpt.all_steps() == [30, 40] and ckpt.latest_step() == 40
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['30', '40']
  ckpt.close()
  # A save that crashed midway leaves an orbax temporary directory: never listed nor restored.
  partial = tmp_path / 'checkpoints' / '50.orbax-checkpoint-tmp-1234567'
  (partial / 'state').mkdir(parents=True)
  ckpt = Checkpointer(tmp_path, make_config(keep=2))
  assert ckpt.latest_step() == 40
  restored = ckpt.restore_latest(abstract_state(state))
  assert int(restored['state']['step']) == 40 and restored['data'] == {'i': 40}


def test_restore_on_a_different_device_count(tmp_path):
  """Saved here (this process's devices), restored in a fresh process with a different CPU device count, sharded."""
  state = {'w': jnp.arange(24.0).reshape(8, 3), 'step': jnp.asarray(5)}
  with Checkpointer(tmp_path, max_to_keep=1) as ckpt:
    ckpt.save(5, state, data={'pos': 11})
  n = 4 if jax.device_count() != 4 else 2  # 8 rows: shard over 4 or 2 devices
  script = textwrap.dedent(f"""
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from dimaskdino_jax.training.checkpoint import Checkpointer, abstract_state
    assert jax.device_count() == {n}, jax.devices()
    mesh = Mesh(np.asarray(jax.devices()), ('data',))
    abstract = {{'w': jax.ShapeDtypeStruct((8, 3), np.float32), 'step': jax.ShapeDtypeStruct((), np.int32)}}
    abstract = abstract_state(abstract, {{'w': NamedSharding(mesh, P('data')), 'step': NamedSharding(mesh, P())}})
    out = Checkpointer({str(tmp_path)!r}).restore_latest(abstract)
    w = out['state']['w']
    assert len(w.sharding.device_set) == {n} and w.addressable_shards[0].data.shape == (8 // {n}, 3)
    np.testing.assert_array_equal(np.asarray(w), np.arange(24.0).reshape(8, 3))
    assert int(out['state']['step']) == 5 and out['data'] == {{'pos': 11}}
    print('OK')
  """)
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': f'--xla_force_host_platform_device_count={n}'}
  proc = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and 'OK' in proc.stdout, proc.stderr[-3000:]
