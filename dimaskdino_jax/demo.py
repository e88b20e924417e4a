"""The CPU demo: train DI-MaskDINO from scratch on the synthetic shapes dataset, evaluate, draw predictions.

  python -m dimaskdino_jax.demo --workdir runs/demo [--steps N] [--config configs/shapes.py] [--config.a.b=value ...]

Writes (if missing) and prepares the shapes dataset, trains the config (resuming if WORKDIR has checkpoints),
evaluates COCO bbox / segm AP on the held-out val split (every decoder layer's predictions, as in the paper's Fig. 1),
writes WORKDIR/eval/metrics.json, WORKDIR/eval/predictions.png and WORKDIR/eval/per_layer.png (AP box and AP mask
of each layer), and prints AP box / AP mask of the final layer with the wall-clock time of each phase.
"""

import argparse
import json
import os
import sys
import time

from dimaskdino_jax import runtime  # noqa: E402

runtime.configure(restart=__name__ == '__main__')  # XLA_FLAGS; malloc tunables (a restart) as a script


def split_cpu(num_devices: int) -> None:
  """Present the CPU to XLA as `num_devices` host devices (before jax starts), so the trainer's data-parallel step
  runs one shard per device. A device count already in XLA_FLAGS wins. The demo's default is one device: under the
  malloc tunables (runtime.py) one device trains configs/shapes.py as fast as two (4.50 / 4.47 and 4.41 / 3.91
  steps/s) and compiles ~30 s sooner (BENCHMARKS.md, session 23). With as many devices as cores, host callbacks of
  more than ~100 KiB can deadlock in jax 0.10.2 (the R50 config's point-loss top-k does; the demo's config stays
  below): docs/jax_notes.md, "Several host devices on a CPU"."""
  flags = os.environ.get('XLA_FLAGS', '')
  if num_devices > 1 and 'xla_force_host_platform_device_count' not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={num_devices}'.strip()


def cpu_devices_for(config, requested: int, cpu_count: int) -> tuple[int, str | None]:
  """(host devices to use, why fewer than requested or None): one device where `requested` devices would leave no
  core to spare and the config's host callbacks are large enough to deadlock jax 0.10.2
  (sharding.deadlock_prone_callback_bytes)."""
  from dimaskdino_jax.training.sharding import deadlock_prone_callback_bytes, format_bytes  # jax not started yet

  size = deadlock_prone_callback_bytes(config, requested, cpu_count)
  if size is None:
    return requested, None
  return 1, (
    f'one host device instead of {requested}: this config hands ~{format_bytes(size)} to a host callback per device, '
    f'and with as many devices as the {cpu_count} cores that can deadlock (docs/jax_notes.md); '
    'XLA_FLAGS=--xla_force_host_platform_device_count=N sets the count regardless'
  )


def parse_args(argv=None):
  """(args, config): the demo's flags, then --config.a.b=value overrides (as eval.py), then --steps; validated."""
  from dimaskdino_jax.analysis.runner import set_num_steps
  from dimaskdino_jax.config import parse_config_overrides, validate

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', default='runs/demo')
  parser.add_argument('--config', default='configs/shapes.py')
  parser.add_argument('--steps', type=int, default=0, help='training steps (0 = the config value)')
  parser.add_argument('--num-visualize', type=int, default=6, help='val images drawn to predictions.png')
  parser.add_argument(
    '--cpu-devices',
    type=int,
    default=1,
    help='XLA host devices on a CPU (data parallel across them; default 1: as fast as 2 on a 2-core CPU under the '
    "malloc tunables, and it compiles sooner). More than 1 only where the config's host callbacks are small enough "
    '(cpu_devices_for)',
  )
  args, config = parse_config_overrides(parser, sys.argv[1:] if argv is None else argv)
  if args.steps:
    set_num_steps(config, args.steps)  # after the overrides: the lr drops given there move with the steps
    validate(config, source=args.config)
  return args, config


def main(argv=None):
  args, config = parse_args(argv)
  devices, why = cpu_devices_for(config, args.cpu_devices, os.cpu_count() or 1)
  if why:
    print(f'demo: {why}')
  split_cpu(devices)

  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.WARNING)
  import jax

  from dimaskdino_jax.analysis.plots import plot_per_layer
  from dimaskdino_jax.data.prepare import ensure_shapes_dataset
  from dimaskdino_jax.evaluation.evaluator import evaluate
  from dimaskdino_jax.training.trainer import train

  times = {}
  t0 = time.time()
  ensure_shapes_dataset(config)
  times['dataset_s'] = time.time() - t0

  t1 = time.time()
  state = train(config, args.workdir)
  times['train_s'] = time.time() - t1

  t2 = time.time()
  variables = {'params': state['params'], 'frozen_bn': state['frozen_bn']}
  eval_dir = os.path.join(args.workdir, 'eval')
  metrics = evaluate(
    config, variables, out_dir=eval_dir, num_visualize=args.num_visualize, per_layer=True, verbose=True
  )
  plot_per_layer(metrics['per_layer'], os.path.join(eval_dir, 'per_layer.png'), title='demo: AP per decoder layer')
  times['eval_s'] = time.time() - t2
  times['total_s'] = time.time() - t0
  summary = {
    'config': args.config,
    'steps': int(config.train.num_steps),
    'batch_size': int(config.train.batch_size),
    'devices': f'{jax.device_count()} x {jax.devices()[0].platform}',
    'cpu_count': os.cpu_count(),
    'AP_box': metrics['bbox']['AP'],
    'AP_mask': metrics.get('segm', {}).get('AP', float('nan')),
    **{k: round(v, 1) for k, v in times.items()},
  }
  with open(os.path.join(args.workdir, 'demo_summary.json'), 'w') as f:
    json.dump(summary, f, indent=2)
  print(
    f'\nDemo: AP box {summary["AP_box"]:.1f}  AP mask {summary["AP_mask"]:.1f}  '
    f'(train {times["train_s"]:.0f} s, eval {times["eval_s"]:.0f} s, total {times["total_s"]:.0f} s)\n'
    f'Pictures: {os.path.join(eval_dir, "predictions.png")}, {os.path.join(eval_dir, "per_layer.png")}'
  )
  return summary


if __name__ == '__main__':
  main()
