"""Scale-out (training/sharding.py): 8 devices = 1 device for the same global batch, checkpoints that move between
device counts, a two-process jax.distributed run, gradient accumulation, and the config / start-up errors.

The multi-device runs are subprocesses (tests/training/scaling_worker.py; the device count is fixed when jax starts):
one with 8 forced CPU devices (steps on meshes of 8, 1 and 4 devices: three compilations of the tiny step) and two
joined by jax.distributed on 127.0.0.1 (2 devices each: 3 steps, then a distributed evaluation), all three started
together. They compile at XLA's lowest backend optimization level, as does the accumulation test here.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dimaskdino_jax.config import ConfigError, validate
from dimaskdino_jax.modeling.model import build_model
from dimaskdino_jax.training import optimizer as optim_lib
from dimaskdino_jax.training import sharding, trainer
from tests.tiny import FAST, prepared_shapes, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT = 3000  # a guard against hangs only: a loaded 2-core machine needs most of it
NUM_VAL = 5


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='module')
def workers(tmp_path_factory):
  """The three worker processes, started (not awaited): the in-process tests run while they work."""
  data = prepared_shapes(tmp_path_factory, seed=1, num_train=16, num_val=NUM_VAL)
  out = str(tmp_path_factory.mktemp('scaling'))
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  port = str(_free_port())
  worker = [sys.executable, '-m', 'tests.training.scaling_worker']
  cmds = {
    'devices': worker + ['devices', data, out],
    'process0': worker + ['process', '0', port, data, out],
    'process1': worker + ['process', '1', port, data, out],
  }
  procs = {
    name: subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for name, cmd in cmds.items()
  }
  yield procs, out
  for p in procs.values():
    if p.poll() is None:
      p.kill()


@pytest.fixture(scope='module')
def runs(workers):
  procs, out = workers
  logs = {}
  for name, p in procs.items():
    logs[name] = p.communicate(timeout=TIMEOUT)[0]
  for name, p in procs.items():
    assert p.returncode == 0, f'{name} exited with {p.returncode}:\n{logs.get(name, "")[-4000:]}'
  with open(os.path.join(out, 'result.json')) as f:
    result = json.load(f)
  result['mp'] = []
  for pid in (0, 1):
    with open(os.path.join(out, f'result_mp_{pid}.json')) as f:
      result['mp'].append(json.load(f))
  result['params'] = dict(np.load(os.path.join(out, 'params.npz')))
  result['eval_dir'] = os.path.join(out, 'eval')
  # Where the time goes (pytest -s shows it): [wall s, CPU s] per phase of each worker.
  print('scaling worker timings:', result['timings'], [r['timings'] for r in result['mp']])
  return result


def _batch(config, n, rng, per_image=2):
  """n images, each with exactly `per_image` GT (so every micro-batch has the same loss normalizer)."""
  s, g = config.data.image_size, config.data.max_instances
  st = config.data.mask_stride
  valid = np.zeros((n, g), bool)
  valid[:, :per_image] = True
  cxcy = rng.uniform(0.3, 0.7, (n, g, 2))
  wh = rng.uniform(0.1, 0.4, (n, g, 2))
  masks = np.zeros((n, g, s // st, s // st), np.uint8)
  for b in range(n):
    for j in range(per_image):
      x0, y0 = ((cxcy[b, j] - wh[b, j] / 2) * s / st).astype(int)
      x1, y1 = ((cxcy[b, j] + wh[b, j] / 2) * s / st).astype(int)
      masks[b, j, y0:y1, x0:x1] = 1
  return {
    'image': rng.integers(0, 255, (n, s, s, 3), dtype=np.uint8),
    'boxes': np.concatenate([cxcy, wh], -1).astype(np.float32),
    'labels': (rng.integers(0, config.model.num_classes, (n, g)) * valid).astype(np.int32),
    'valid': valid,
    'masks': masks,
  }


def test_grad_accumulation_4x4_equals_one_step_of_16(workers):
  del workers  # started first: this in-process test runs while the workers do
  # Deterministic losses (no DN noise, mask costs / losses at every pixel): the only difference between 4 micro-
  # batches of 4 and one batch of 16 is the order of floating-point sums.
  overrides = {  # the workers' model (no DI / BATO: one selection), without DN
    'model.encoder.num_layers': 1,
    'model.decoder.num_layers': 2,
    'model.di.enabled': False,
    'model.bato.enabled': False,
    'model.di.selection_ks': (12,),
    'model.dn.mode': 'none',
    'loss.num_points': 0,
    'matcher.num_points': 0,
    'data.mask_stride': 4,
  }
  big = tiny_config(**overrides)
  acc = tiny_config(**overrides, **{'optim.grad_accum_steps': 4})
  model = build_model(big)
  batch = _batch(big, 16, np.random.default_rng(0))
  shape = (4, 64, 64, 3)
  params = trainer.abstract_params(model, shape)

  def run(config, batches):
    tx = optim_lib.build_optimizer(config, params)
    state = trainer.init_state(config, model, tx, shape)
    arrays = [{k: jnp.asarray(v) for k, v in b.items()} for b in batches]
    step = jax.jit(trainer.make_train_step(config, model, tx)).lower(state, arrays[0]).compile(compiler_options=FAST)
    states = []
    for b in arrays:
      state, scalars = step(state, b)
      states.append(state)
    return states, scalars

  def flat(tree, name):
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(optax.tree_utils.tree_get(tree, name))])

  def direction(v):
    return v / np.linalg.norm(v)

  (s16,), m16 = run(big, [batch])
  micro = [{k: v[i * 4 : (i + 1) * 4] for k, v in batch.items()} for i in range(4)]
  states4, _ = run(acc, micro)
  s4 = states4[-1]
  assert float(m16['skipped']) == 0
  # Adam's first moment after one update is (1 - b1) * (clipped mean gradient): the accumulated gradient itself.
  g16, g4 = flat(s16['opt_state'], 'mu'), flat(s4['opt_state'], 'mu')
  first = flat(states4[0]['opt_state'], 'acc_grads')  # the gradient of the first micro-batch alone
  assert np.abs(g16).max() > 0
  # Measured 2.7e-4 (L2 of the unit-direction difference; 8e-4 with DI's two selections): float32 summation order,
  # amplified where near-tied top-k selections flip. Norms: measured 1.2e-7 relative.
  err = np.linalg.norm(direction(g4) - direction(g16))
  print(f'accumulation: direction error {err:.2e}, norm ratio {np.linalg.norm(g4) / np.linalg.norm(g16) - 1:.2e}')
  assert err < 5e-3, err
  assert np.linalg.norm(g4) == pytest.approx(np.linalg.norm(g16), rel=5e-3)
  # The check can fail: one micro-batch's gradient (4 of the 16 images) points elsewhere.
  assert np.linalg.norm(direction(first) - direction(g16)) > 0.1
  # One optimizer update in both runs (the first 3 micro-steps update nothing); Adam's first step is ~ lr * sign(g),
  # so entries whose gradient is ~0 may differ by up to 2 lr: compare how many moved differently.
  p16 = np.concatenate([np.ravel(x) for x in jax.tree.leaves(s16['params'])])
  p4 = np.concatenate([np.ravel(x) for x in jax.tree.leaves(s4['params'])])
  p3 = np.concatenate([np.ravel(x) for x in jax.tree.leaves(states4[2]['params'])])
  p0 = np.concatenate(
    [np.ravel(x) for x in jax.tree.leaves(trainer.init_state(big, model, optax.identity(), shape)['params'])]
  )
  np.testing.assert_array_equal(p3, p0)  # no update before the 4th micro-step
  print(f'accumulation: params differing by > 1e-6: {np.mean(np.abs(p4 - p16) > 1e-6):.2%}')  # measured 0.29 %
  assert np.mean(np.abs(p4 - p16) > 1e-6) < 0.02
  assert int(s4['step']) == 4 and int(s16['step']) == 1


def _steps(curve):
  return {int(k): v for k, v in curve.items()}


def test_eight_devices_match_one_device(runs):
  # Same global batch of 8: the loss and gradient norm agree to float32 summation order (measured 2.1e-7 and 2.3e-5
  # relative).
  l8, l1 = runs['loss_d8']['1'], runs['loss_d1']['1']
  assert l8 == pytest.approx(l1, rel=1e-5)
  assert runs['grad_norm_d8'] == pytest.approx(runs['grad_norm_d1'], rel=1e-4)
  # Params after one AdamW step: the first Adam update is ~ lr * g / |g|, so entries whose gradient is ~0 amplify
  # rounding differences up to a fraction of lr (1e-3); measured max 1.9e-4, and 0.49 % of entries above 1e-6.
  p = runs['params']
  n = len(p) // 2
  assert n > 50
  diffs = np.concatenate([np.abs(p[f'd8_{i}'] - p[f'd1_{i}']).ravel() for i in range(n)])
  moved = np.concatenate([np.abs(p[f'd8_{i}']).ravel() for i in range(n)])
  assert np.isfinite(diffs).all() and moved.size == diffs.size
  print(
    f'8 vs 1 device: loss rel {abs(l8 - l1) / abs(l1):.1e}, grad norm rel '
    f'{abs(runs["grad_norm_d8"] - runs["grad_norm_d1"]) / runs["grad_norm_d1"]:.1e}, params max {diffs.max():.1e}, '
    f'> 1e-6: {np.mean(diffs > 1e-6):.2%}'
  )
  assert diffs.max() < 5e-4, diffs.max()
  assert np.mean(diffs > 1e-6) < 0.02, np.mean(diffs > 1e-6)


def test_gradients_summed_as_one_flat_vector_without_sampled_points(runs):
  # The tiny model's mask losses are dense: the 8-device step (traced once) ran each shard's losses and gradients
  # in a shard_map and summed them as one flat vector (trainer.flat_gradient_sum); the loss and gradient agreement
  # with one device is test_eight_devices_match_one_device's.
  assert runs['flat_traced_8'] == 1
  # With sampled mask points XLA partitions the step (no flat sum traced), and it too gives the one-device step:
  # measured 1e-7 relative for the loss.
  assert runs['flat_traced_points'] == 0
  l8, l1 = runs['points_loss_d8'], runs['points_loss_d1']
  assert l8 == pytest.approx(l1, rel=1e-5)
  assert runs['points_grad_norm_d8'] == pytest.approx(runs['points_grad_norm_d1'], rel=1e-4)
  print(f'sampled points, 8 vs 1 device: loss rel {abs(l8 - l1) / abs(l1):.1e}')


def test_matching_callback_sees_only_its_shard(runs):
  # One traced step per mesh: 8 host calls of 1 image each on 8 devices, one call of the 8 images on 1 device.
  assert runs['rows_8'] == [1] * 8
  assert runs['rows_1'] == [8]


def test_chunked_deformable_attention_gradients_per_shard(runs):
  # The R50 config's CPU path ('xla', value gradient chunked by a scan, value bias apart) under a data mesh of 8:
  # it failed to trace before (a scan carry and a bias gradient that did not vary over the shards); now each
  # gradient equals the unsharded one to float32 rounding (the bias's sums over the batch change order).
  diffs, scales = runs['msda_mesh'][:4], runs['msda_mesh'][4:]
  for name, diff, scale in zip(('value', 'locations', 'weights', 'bias'), diffs, scales):
    assert diff <= 1e-6 * scale + 1e-7, f'grad {name}: {diff} (largest entry {scale})'


def test_checkpoint_from_8_devices_resumes_on_1_and_4(runs):
  ref = _steps(runs['continued_d8'])
  assert sorted(ref) == [1, 2, 3]
  for n in (1, 4):
    got = _steps(runs[f'resumed_on_{n}'])
    assert runs[f'resumed_on_{n}_devices'] == n
    assert sorted(got) == [1, 2, 3]
    # Step 2 is the first step after the restore: same loss as the 8-device run; step 3 drifts by rounding only.
    assert got[2] == pytest.approx(ref[2], rel=1e-5), (n, got, ref)
    assert got[3] == pytest.approx(ref[3], rel=1e-4), (n, got, ref)


def test_two_processes_match_single_process(runs):
  mp = _steps(runs['mp'][0]['loss'])
  ref = _steps(runs['continued_d8'])
  assert sorted(mp) == [1, 2, 3]
  for s in (1, 2, 3):
    assert mp[s] == pytest.approx(ref[s], rel=1e-4), (s, mp, ref)
  # Each process saved its own data-iterator state in the checkpoint.
  assert [f for f in runs['mp'][0]['files'] if f.endswith('.json')] == ['process_0-of-2.json', 'process_1-of-2.json']


def test_two_process_evaluation_covers_every_val_image_once(runs):
  p0, p1 = runs['mp']
  split = p0['split_ids']
  assert len(split) == NUM_VAL
  for p in (p0, p1):
    # Each process evaluated its own images: non-empty, disjoint shares (3 and 2 of the 5 val images).
    assert len(p['local_ids']) == 1 and len(p['local_ids'][0]) > 0
    assert set(p['local_result_ids']) <= set(p['local_ids'][0])
  assert not set(p0['local_ids'][0]) & set(p1['local_ids'][0])
  assert sorted(len(p['local_ids'][0]) for p in (p0, p1)) == [2, 3]
  # Process 0 merged both shares: every val image exactly once, with the detections of both processes.
  (merged,) = p0['merged_ids']
  assert sorted(merged) == split and len(merged) == len(set(merged))
  assert set(p0['merged_result_ids']) == set(p0['local_result_ids']) | set(p1['local_result_ids'])
  assert set(p1['local_result_ids']) and 'merged_ids' not in p1  # process 1 evaluated images but merged nothing

  # One COCO evaluation (process 0), the same metrics returned by both processes, written once.
  def canonical(m):  # NaN (a size bucket without GT) compares equal as text
    return json.dumps(m, sort_keys=True)

  assert canonical(p0['metrics']) == canonical(p1['metrics'])
  assert set(p0['metrics']) >= {'bbox', 'segm'} and 0 <= p0['metrics']['bbox']['AP'] <= 100
  assert p0['metrics']['images'] == {'evaluated': NUM_VAL, 'undecodable': 0}
  with open(os.path.join(runs['eval_dir'], 'metrics.json')) as f:
    assert canonical(json.load(f)) == canonical(p0['metrics'])


def test_two_process_evaluation_during_training(runs):
  """train.eval_every with two processes: one record (process 0) with the AP of the standalone evaluation of the
  same params, and the best checkpoint written by both processes."""
  p0, _ = runs['mp']
  (record,) = p0['periodic']
  assert record['step'] == 3 and record['eval/best_step'] == 3
  assert record['eval/bbox_AP'] == p0['metrics']['bbox']['AP']
  assert record['eval/segm_AP'] == p0['metrics']['segm']['AP'] == record['eval/best']
  assert p0['best'] == ['3']


def test_batch_not_divisible_by_devices_is_a_config_error():
  c = tiny_config()
  c.train.batch_size = 6
  c.mesh.data = 4
  with pytest.raises(ConfigError, match='train.batch_size.*mesh.data'):
    validate(c, source='configs/x.py')
  c.mesh.data = 1
  mesh = sharding.make_mesh(c)
  assert sharding.check_batch(c, mesh) == 6
  fake = type('M', (), {'shape': {sharding.DATA: 4}})()
  with pytest.raises(sharding.MeshError, match='train.batch_size = 6 is not divisible by the 4 devices'):
    sharding.check_batch(c, fake)
  c.mesh.data = 3  # more than the devices here
  with pytest.raises(sharding.MeshError, match='mesh.data = 3'):
    sharding.make_mesh(c, devices=jax.devices()[:1])


def test_initialize_distributed_from_flags_env_and_slurm(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kw: calls.append(kw))
  for var in (sharding.ENV_ADDRESS, sharding.ENV_NUM, sharding.ENV_ID, 'SLURM_NTASKS', 'SLURM_STEP_ID'):
    monkeypatch.delenv(var, raising=False)
  assert sharding.initialize_distributed() is False and calls == []
  assert sharding.initialize_distributed('h:1234', 2, 1) is True
  assert calls[-1] == {'coordinator_address': 'h:1234', 'num_processes': 2, 'process_id': 1}
  monkeypatch.setenv(sharding.ENV_ADDRESS, 'c:99')
  monkeypatch.setenv(sharding.ENV_NUM, '4')
  monkeypatch.setenv(sharding.ENV_ID, '3')
  assert sharding.initialize_distributed() is True
  assert calls[-1] == {'coordinator_address': 'c:99', 'num_processes': 4, 'process_id': 3}
  monkeypatch.delenv(sharding.ENV_ID)
  with pytest.raises(sharding.MeshError, match='missing: process id'):
    sharding.initialize_distributed()
  monkeypatch.delenv(sharding.ENV_ADDRESS)
  monkeypatch.delenv(sharding.ENV_NUM)
  monkeypatch.setenv('SLURM_NTASKS', '16')
  monkeypatch.setenv('SLURM_STEP_ID', '0')
  assert sharding.initialize_distributed() is True
  assert calls[-1] == {}  # jax's own SLURM detection
