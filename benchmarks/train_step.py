"""Times one jitted training step (forward, losses with host matching, AdamW update) for a config.

  python benchmarks/train_step.py --config configs/shapes.py [--batch-size 8] [--steps 10] [--config.x=y ...]
  python benchmarks/train_step.py --config configs/shapes.py --processes 2 [--gradient_sum=per_leaf] [--nopin]

Random images and GT boxes/masks of the config's shapes (no dataset needed). Prints compile seconds, the median
step time after warm-up, the trainable parameter count and XLA's memory analysis of the compiled step (arguments,
outputs, temporaries; on a GPU also the device's peak bytes in use). `--json OUT` writes these figures (per image
too). `--config.train.trainable=mask_branch` times the Mask Frozen-DETR mode (only the mask branch
differentiated and updated; optimizer state for it only).

`--processes N` times the data-parallel step across N processes on this machine (`jax.distributed` on 127.0.0.1,
one CPU device each, pinned one per core with `taskset` unless `--nopin` or the machine has fewer cores): each
process feeds its rows of the global batch to the trainer's mesh step (`trainer.jit_train_step`), and process 0
prints the median over the steps of the slowest process and which gradient sum the step used (one flat vector or
XLA's per-parameter all-reduces, `trainer.flat_gradient_sum`; `--gradient_sum=per_leaf` forces the latter, to
compare).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dimaskdino_jax import runtime  # noqa: E402

runtime.configure(restart=__name__ == '__main__')  # XLA_FLAGS; malloc tunables (a restart) as a script

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dimaskdino_jax.losses.criterion import compute_losses  # noqa: E402
from dimaskdino_jax.modeling.model import build_model  # noqa: E402
from dimaskdino_jax.training import optimizer as optim_lib  # noqa: E402
from dimaskdino_jax.training import partition, sharding, trainer  # noqa: E402
from dimaskdino_jax.training.trainer import batch_to_device, init_state, make_train_step  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/shapes.py', 'config file')
_STEPS = flags.DEFINE_integer('steps', 10, 'timed steps')
_BS = flags.DEFINE_integer('batch_size', 0, 'batch size (0 = config)')
_JSON = flags.DEFINE_string('json', None, 'write the figures (times, memory, per image) to this file')
_FAST = flags.DEFINE_bool(
  'fast_compile', False, "XLA's lowest optimization level (quick CPU smoke tests of this script; never for timings)"
)
_LOSS_ONLY = flags.DEFINE_bool('loss_only', False, 'time only the losses (matching + criterion) on fixed predictions')
_PROCESSES = flags.DEFINE_integer('processes', 1, 'processes on this machine joined by jax.distributed (data parallel)')
_PIN = flags.DEFINE_bool('pin', True, 'with --processes: pin process i to core i (taskset) where cores allow')
_GRAD_SUM = flags.DEFINE_enum(
  'gradient_sum', 'auto', ['auto', 'per_leaf'], "with --processes: the trainer's choice, or XLA's per-leaf all-reduces"
)
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'internal: this worker of --processes')
_PORT = flags.DEFINE_integer('port', None, 'internal: the coordinator port of --processes')


# XLA options for a quick compile (CPU smoke runs of the benchmark scripts, e.g. benchmarks/gpu_check.py --cpu-smoke).
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def fake_batch(config, bsz, rng):
  s, g, st = config.data.image_size, config.data.max_instances, config.data.mask_stride
  n = rng.integers(1, g + 1, bsz)
  valid = np.arange(g)[None] < n[:, None]
  cxcy = rng.uniform(0.2, 0.8, (bsz, g, 2))
  wh = rng.uniform(0.05, 0.3, (bsz, g, 2))
  masks = np.zeros((bsz, g, s // st, s // st), np.uint8)
  for b in range(bsz):
    for j in range(n[b]):
      x0, y0 = ((cxcy[b, j] - wh[b, j] / 2) * s / st).astype(int).clip(0)
      x1, y1 = ((cxcy[b, j] + wh[b, j] / 2) * s / st).astype(int)
      masks[b, j, y0:y1, x0:x1] = 1
  return dict(
    image=rng.integers(0, 255, (bsz, s, s, 3), dtype=np.uint8),
    boxes=np.concatenate([cxcy, wh], -1).astype(np.float32),
    labels=rng.integers(0, config.model.num_classes, (bsz, g)).astype(np.int32),
    valid=valid,
    masks=masks,
  )


def time_losses(config, model, state, batch):
  """Median time of compute_losses (forward) on the predictions of one fixed batch."""
  targets = {k: batch[k] for k in ('boxes', 'labels', 'valid', 'masks')}
  variables = {'params': state['params'], 'frozen_bn': state['frozen_bn']}
  preds = jax.jit(lambda v, i, t: model.apply(v, i, t, train=True, rngs={'dn': jax.random.key(0)}))(
    variables, batch['image'], targets
  )
  loss = jax.jit(lambda p, t: compute_losses(p, t, jax.random.key(0), config)[0])
  t0 = time.perf_counter()
  jax.block_until_ready(loss(preds, targets))
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(_STEPS.value):
    t0 = time.perf_counter()
    jax.block_until_ready(loss(preds, targets))
    times.append(time.perf_counter() - t0)
  print(
    f'losses only: config={config.name} batch={batch["image"].shape[0]} points={config.loss.num_points}: '
    f'compile {compile_s:.1f} s, median {np.median(times) * 1e3:.0f} ms'
  )


def launch_processes(n: int) -> None:
  """Runs this script as `n` workers (--process_id i --port P), process i on core i when --pin and cores allow."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  pin = _PIN.value and (os.cpu_count() or 1) >= n and shutil.which('taskset') is not None
  env = dict(os.environ)
  # One CPU device per process: a device count forced in XLA_FLAGS would give each process several.
  env['XLA_FLAGS'] = ' '.join(f for f in env.get('XLA_FLAGS', '').split() if 'host_platform_device_count' not in f)
  procs = []
  for pid in range(n):
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], f'--process_id={pid}', f'--port={port}']
    procs.append(subprocess.Popen((['taskset', '-c', str(pid)] if pin else []) + cmd, env=env))
  codes = [p.wait() for p in procs]
  if any(codes):
    raise SystemExit(f'--processes {n}: worker exit codes {codes}')


def time_processes(config, bsz: int) -> None:
  """One worker of --processes: the mesh step on this process's rows of a global batch of `bsz` fake images."""
  from jax.experimental import multihost_utils

  n, pid = _PROCESSES.value, _PROCESS_ID.value
  jax.distributed.initialize(f'127.0.0.1:{_PORT.value}', n, pid)
  if bsz % n:
    raise SystemExit(f'--processes {n} must divide the batch size {bsz}')
  if _GRAD_SUM.value == 'per_leaf':
    if not callable(getattr(trainer, 'flat_gradient_sum', None)):  # what make_train_step asks at trace time
      raise SystemExit('--gradient_sum=per_leaf: trainer.flat_gradient_sum is gone; update this benchmark')
    trainer.flat_gradient_sum = lambda config: False
  mesh = sharding.make_mesh(config)
  model = build_model(config)
  local = bsz // n
  shape = (local, config.data.image_size, config.data.image_size, 3)
  tx = optim_lib.build_optimizer(config, partition.trainable_params(config, trainer.abstract_params(model, shape)))
  state = sharding.put_replicated(init_state(config, model, tx, shape), mesh)
  step = trainer.jit_train_step(config, model, tx, mesh)
  rng = np.random.default_rng(pid)  # each process its own rows
  batches = [fake_batch(config, local, rng) for _ in range(3)]
  t0 = time.perf_counter()
  state, m = trainer.run_step(step, mesh, state, batches[0])
  jax.block_until_ready(m['loss'])
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(_STEPS.value):
    t0 = time.perf_counter()
    state, m = trainer.run_step(step, mesh, state, batches[(i + 1) % 3])
    jax.block_until_ready(m['loss'])
    times.append(time.perf_counter() - t0)
  every = np.asarray(multihost_utils.process_allgather(np.asarray(times)))  # (processes, steps)
  if pid:
    return
  slowest = every.max(axis=0)  # a step ends for the run when its slowest process is done
  with jax.set_mesh(mesh):  # the mesh the step was traced under decides (data_size)
    flat = trainer.flat_gradient_sum(config)
  pinned = len(os.sched_getaffinity(0)) == 1  # taskset by launch_processes
  print(
    f'config={config.name} global batch={bsz} ({local} per process) canvas={config.data.image_size} processes={n} '
    f'({"pinned one per core" if pinned else "not pinned"}), gradient sum: '
    f'{"one flat vector" if flat else "per parameter leaf (XLA)"}'
  )
  medians = ', '.join(f'{np.median(t) * 1e3:.0f}' for t in every)
  print(
    f'first step (compile + run): {compile_s:.1f} s; median step {np.median(slowest) * 1e3:.0f} ms (each process: '
    f'{medians} ms); {bsz / np.median(slowest):.1f} images/s; loss {float(m["loss"]):.2f}'
  )
  if _JSON.value:
    result = {
      'config': config.name,
      'batch_size': bsz,
      'canvas': int(config.data.image_size),
      'processes': n,
      'pinned': bool(pinned),
      'gradient_sum': 'flat' if flat else 'per_leaf',
      'steps': _STEPS.value,
      'compile_s': round(compile_s, 3),
      'median_ms': round(float(np.median(slowest)) * 1e3, 3),
      'process_median_ms': [round(float(np.median(t)) * 1e3, 3) for t in every],
      'images_per_s': round(bsz / float(np.median(slowest)), 3),
      'loss': float(m['loss']),
    }
    with open(_JSON.value, 'w') as f:
      json.dump(result, f, indent=1)


def main(argv):
  del argv
  config = _CONFIG.value
  bsz = _BS.value or config.train.batch_size
  if _PROCESSES.value > 1:
    if _PROCESS_ID.value is None:
      launch_processes(_PROCESSES.value)
    else:
      time_processes(config, bsz)
    return
  model = build_model(config)
  shape = (bsz, config.data.image_size, config.data.image_size, 3)
  params_shape = jax.eval_shape(
    lambda i: model.init({'params': jax.random.key(0), 'dn': jax.random.key(1)}, i),
    jax.ShapeDtypeStruct(shape, jnp.uint8),
  )['params']
  tx = optim_lib.build_optimizer(config, partition.trainable_params(config, params_shape))
  if _FAST.value:  # the init compiled with the same options, as one program
    state = jax.jit(lambda: init_state(config, model, tx, shape)).lower().compile(compiler_options=FAST_COMPILE)()
  else:
    state = init_state(config, model, tx, shape)
  rng = np.random.default_rng(0)
  batches = [batch_to_device(fake_batch(config, bsz, rng)) for _ in range(3)]
  if _LOSS_ONLY.value:
    time_losses(config, model, state, batches[0])
    return
  t0 = time.perf_counter()
  options = FAST_COMPILE if _FAST.value else None
  step = jax.jit(make_train_step(config, model, tx), donate_argnums=0).lower(state, batches[0])
  step = step.compile(compiler_options=options)
  mem = step.memory_analysis()
  opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state['opt_state']))
  state, m = step(state, batches[0])
  jax.block_until_ready(m['loss'])
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(_STEPS.value):
    t0 = time.perf_counter()
    state, m = step(state, batches[i % 3])
    jax.block_until_ready(m['loss'])
    times.append(time.perf_counter() - t0)
  print(
    f'config={config.name} batch={bsz} canvas={config.data.image_size} '
    f'devices={jax.device_count()} ({jax.devices()[0].platform}); malloc: {runtime.describe_malloc()}'
  )
  print(
    f'first step (compile + run): {compile_s:.1f} s; median step {np.median(times) * 1e3:.0f} ms; '
    f'{bsz / np.median(times):.1f} images/s; loss {float(m["loss"]):.2f}'
  )
  print(partition.describe(config, state['params']) + f'; optimizer state {opt_bytes / 2**20:.2f} MiB')
  if mem is not None:
    mib = lambda n: f'{n / 2**20:.1f} MiB'  # noqa: E731
    print(
      f'XLA memory analysis of the step: arguments {mib(mem.argument_size_in_bytes)}, outputs '
      f'{mib(mem.output_size_in_bytes)}, temporaries {mib(mem.temp_size_in_bytes)}, aliased '
      f'{mib(mem.alias_size_in_bytes)}'
    )
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  if peak is not None:
    print(f'device peak bytes in use: {peak / 2**30:.2f} GiB ({peak / bsz / 2**30:.2f} GiB per image)')
  if _JSON.value:
    result = {
      'config': config.name,
      'batch_size': bsz,
      'canvas': int(config.data.image_size),
      'remat': bool(config.model.remat),
      'backbone_dtype': str(config.model.backbone.dtype),
      'msda_impl': str(config.model.msda_impl),
      'backend': jax.default_backend(),
      'device_kind': jax.devices()[0].device_kind,
      'devices': jax.device_count(),
      'steps': _STEPS.value,
      'fast_compile': _FAST.value,
      'malloc': runtime.describe_malloc(),
      'compile_s': round(compile_s, 3),
      'median_ms': round(float(np.median(times)) * 1e3, 3),
      'images_per_s': round(bsz / float(np.median(times)), 3),
      'loss': float(m['loss']),
      'device_peak_bytes': peak,
      'device_peak_bytes_per_image': None if peak is None else peak / bsz,
    }
    if mem is not None:
      xla_peak = (
        mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
      )
      result.update(xla_temp_bytes=int(mem.temp_size_in_bytes), xla_peak_bytes=int(xla_peak))
      result['xla_peak_bytes_per_image'] = xla_peak / bsz
    with open(_JSON.value, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  app.run(main)
