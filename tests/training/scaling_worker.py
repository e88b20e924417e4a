"""Subprocess side of tests/training/test_scaling.py (XLA device flags must be set before jax is imported).

python -m tests.training.scaling_worker devices DATA_DIR OUT_DIR
    8 forced CPU devices, one process: train() one step on an 8-device mesh and on a 1-device mesh (same global
    batch), then resume the 8-device checkpoint of step 1 on 1 and on 4 devices; also counts the batch rows each
    host matching callback receives. Writes OUT_DIR/params.npz (params after step 1) and OUT_DIR/result.json.
python -m tests.training.scaling_worker process ID PORT DATA_DIR OUT_DIR
    one of two processes (2 CPU devices each) joined by jax.distributed on 127.0.0.1:PORT: 3 steps of train() with
    an evaluation during training at step 3 (train.eval_every), then evaluate() of the final params (each process
    its share of the val images, gathered to process 0). Writes OUT_DIR/result_mp_ID.json.

Both compile at XLA's lowest backend optimization level (the steps are tiny: compiling dominates) and record the
wall and CPU seconds of each phase in the result ('timings'). The model is the tiny one with 1 encoder and 2 decoder
layers, without DI and BATO (a single top-k selection) and with the mask losses at every pixel of its 16 x 16 mask
maps: these are per-image computations that sharding does not touch (tests/modeling covers them), and they make a
third of the compile time. DN (random noise drawn on the global batch) stays on.
"""

import json
import os
import shutil
import sys
import time

from dimaskdino_jax import runtime

mode = sys.argv[1]
_DEVICES = {'devices': 8, 'process': 2}[mode]
os.environ['XLA_FLAGS'] = (
  f'--xla_force_host_platform_device_count={_DEVICES} {runtime.XLA_CPU_FLAGS} '
  '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false'
)
os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dimaskdino_jax.training import sharding  # noqa: E402

GLOBAL_BATCH = 8
SCALING_MODEL = {
  'model.encoder.num_layers': 1,
  'model.decoder.num_layers': 2,
  'model.di.enabled': False,
  'model.bato.enabled': False,
  'model.di.selection_ks': (12,),
  'loss.num_points': 0,
  'matcher.num_points': 0,
}
TIMINGS = {}


class phase:
  """Records the wall and CPU seconds of a block in TIMINGS[name]."""

  def __init__(self, name):
    self.name = name

  def __enter__(self):
    self.t0, self.c0 = time.perf_counter(), time.process_time()

  def __exit__(self, *exc):
    TIMINGS[self.name] = [round(time.perf_counter() - self.t0, 1), round(time.process_time() - self.c0, 1)]


def config_for(data_dir, steps, devices):
  from tests.tiny import tiny_config

  c = tiny_config(**SCALING_MODEL)
  c.data.data_dir = data_dir
  c.train.num_steps = steps
  c.train.batch_size = GLOBAL_BATCH
  c.train.log_every = 1
  c.train.checkpoint_every = 100  # only the final step of each run is saved
  c.train.keep_checkpoints = 5
  c.optim.lr_drop_steps = (1000,)
  c.mesh.data = devices
  c.eval.batch_size = 2
  return c


def losses(workdir):  # the training records (evaluation records have no 'loss')
  from dimaskdino_jax.training.writers import read_metrics

  return {int(r['step']): float(r['loss']) for r in read_metrics(workdir) if 'loss' in r}


def msda_grads_on_mesh():
  """Largest difference between the gradients (value, locations, weights, value bias) of the 'xla' deformable
  attention with the CPU's chunked value gradient (a scan) run per shard on a data mesh of 8 devices and run
  unsharded. The R50 config takes this path on CPUs (the tiny model takes 'dense'); under the mesh the scan's carry
  and the replicated bias's gradient must vary over the shards (kernels/ms_deform_attn/xla.py)."""
  import jax.numpy as jnp

  import kernels.ms_deform_attn as msda
  from tests.kernels.test_ms_deform_attn import SHAPES, make_inputs

  value, loc, attn = make_inputs(7, n=8, lq=41, m=4, d=3, p=2)
  bias = np.random.default_rng(8).normal(size=(4, 3)).astype(np.float32)
  cot = np.random.default_rng(9).normal(size=(8, 41, 12)).astype(np.float32)
  starts = (0, 35, 47)
  msda.CHUNK_BYTES, chunk_bytes = 4 * 2 * 4 * len(SHAPES) * 2 * 3 * 4, msda.CHUNK_BYTES  # 4 queries per chunk

  def grads(*args):
    f = lambda v, lc, a, b: msda.ms_deform_attn(v, SHAPES, starts, lc, a, impl='xla', value_bias=b)  # noqa: E731
    return jax.vjp(f, *args)[1](jnp.asarray(cot))

  try:
    plain = jax.jit(grads)(value, loc, attn, bias)
    mesh = sharding.make_mesh()  # all 8 devices on the data axis
    with jax.set_mesh(mesh):
      text = jax.jit(grads).lower(value, loc, attn, bias).as_text()
      sharded = jax.jit(grads)(value, loc, attn, bias)
  finally:
    msda.CHUNK_BYTES = chunk_bytes
  assert 'shard_map' in text or 'manual' in text, 'the op did not run per shard'
  return [float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(plain, sharded)] + [
    float(np.max(np.abs(np.asarray(a)))) for a in plain
  ]


def run_devices(data_dir, out):
  from dimaskdino_jax.losses import matcher
  from dimaskdino_jax.training import trainer
  from dimaskdino_jax.training.trainer import train
  from dimaskdino_jax.training.writers import read_metrics

  assert jax.device_count() == 8, jax.devices()
  rows = []  # batch rows of every host matching call (traced once per compiled step, called per device per step)
  solve = matcher._solve_host

  def counting(costs, gt_valid, num_queries):
    rows.append(int(np.shape(gt_valid)[-2]))
    return solve(costs, gt_valid, num_queries)

  matcher._solve_host = counting
  traced = []  # per traced step: whether it summed the shards' gradients as one flat vector
  per_shard = trainer._per_shard_with_flat_sum

  def recording(*args):
    traced.append(True)
    return per_shard(*args)

  trainer._per_shard_with_flat_sum = recording
  result = {}
  w8, w1 = os.path.join(out, 'd8'), os.path.join(out, 'd1')
  with phase('train 1 step on 8 devices'):
    s8 = train(config_for(data_dir, 1, 8), w8, verbose=False)
  result['rows_8'], rows[:] = list(rows), []
  result['flat_traced_8'], traced[:] = len(traced), []
  with phase('train 1 step on 1 device'):
    s1 = train(config_for(data_dir, 1, 1), w1, verbose=False)
  result['rows_1'], rows[:] = list(rows), []
  np.savez(
    os.path.join(out, 'params.npz'),
    **{f'd8_{i}': np.asarray(x) for i, x in enumerate(jax.tree.leaves(s8['params']))},
    **{f'd1_{i}': np.asarray(x) for i, x in enumerate(jax.tree.leaves(s1['params']))},
  )
  result['loss_d8'], result['loss_d1'] = losses(w8), losses(w1)
  result['grad_norm_d8'], result['grad_norm_d1'] = (read_metrics(w)[0]['grad_norm'] for w in (w8, w1))
  # The 8-device checkpoint of step 1, resumed on 1 and on 4 devices; the 8-device run continued as the reference.
  for n in (1, 4):
    shutil.copytree(w8, os.path.join(out, f'resume{n}'))
  with phase('continue on 8 devices'):
    train(config_for(data_dir, 3, 8), w8, verbose=False)
  result['continued_d8'] = losses(w8)
  for n in (1, 4):
    wd = os.path.join(out, f'resume{n}')
    with phase(f'resume on {n}'):
      state = train(config_for(data_dir, 3, n), wd, verbose=False)
    result[f'resumed_on_{n}'] = losses(wd)
    result[f'resumed_on_{n}_devices'] = len(jax.tree.leaves(state['params'])[0].sharding.device_set)
  # Sampled mask points (their uniforms are drawn for the whole batch): XLA partitions the step instead.
  traced[:] = []
  with phase('sampled points: 1 step on 8 and on 1 device'):
    for n in (8, 1):
      c = config_for(data_dir, 1, n)
      c.loss.num_points = c.matcher.num_points = 16
      wd = os.path.join(out, f'points{n}')
      train(c, wd, verbose=False)
      result[f'points_loss_d{n}'], result[f'points_grad_norm_d{n}'] = losses(wd)[1], read_metrics(wd)[0]['grad_norm']
  result['flat_traced_points'] = len(traced)
  with phase('deformable attention gradients per shard'):
    result['msda_mesh'] = msda_grads_on_mesh()
  result['timings'] = TIMINGS
  with open(os.path.join(out, 'result.json'), 'w') as f:
    json.dump(result, f)


def run_process(pid, port, data_dir, out):
  from dimaskdino_jax.evaluation import evaluator
  from dimaskdino_jax.training.trainer import train

  sharding.initialize_distributed(f'127.0.0.1:{port}', 2, pid)
  assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
  wd = os.path.join(out, 'mp')
  config = config_for(data_dir, 3, -1)
  config.train.eval_every = 3  # the evaluation during training, at the last step (training/periodic_eval.py)
  with phase('train 3 steps'):
    state = train(config, wd, verbose=False)
  result = {'loss': losses(wd), 'files': sorted(os.listdir(os.path.join(wd, 'checkpoints', '3', 'data')))}
  from dimaskdino_jax.training.writers import read_metrics

  result['periodic'] = [r for r in read_metrics(wd) if 'eval/bbox_AP' in r]
  result['best'] = sorted(os.listdir(os.path.join(wd, 'best')))

  # What each process evaluated and what process 0 merged (the evaluator's own functions, recorded on the way).
  gather, merge = evaluator.gather_to_process0, evaluator.merge_process_results

  def recording_gather(shares):
    result['local_ids'] = [list(s['img_ids']) for s in shares]
    result['local_result_ids'] = sorted({d['image_id'] for s in shares for d in s['results'].get('bbox', [])})
    return gather(shares)

  def recording_merge(shares, all_ids):
    merged = merge(shares, all_ids)
    result['merged_ids'] = [m['img_ids'] for m in merged]
    result['merged_result_ids'] = sorted({d['image_id'] for m in merged for d in m['results'].get('bbox', [])})
    result['split_ids'] = sorted(int(i) for i in all_ids)
    return merged

  evaluator.gather_to_process0, evaluator.merge_process_results = recording_gather, recording_merge
  variables = {'params': state['params'], 'frozen_bn': state['frozen_bn']}
  with phase('evaluate'):
    result['metrics'] = evaluator.evaluate(config, variables, out_dir=os.path.join(out, 'eval'), verbose=False)
  result['timings'] = TIMINGS
  with open(os.path.join(out, f'result_mp_{pid}.json'), 'w') as f:
    json.dump(result, f)
  jax.distributed.shutdown()


if __name__ == '__main__':
  if mode == 'devices':
    run_devices(sys.argv[2], sys.argv[3])
  else:
    run_process(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
