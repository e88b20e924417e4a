"""The CPU demo: train DI-MaskDINO from scratch on the synthetic shapes dataset, evaluate, draw predictions.

  python -m dimaskdino_jax.demo --workdir runs/demo [--steps N] [--config configs/shapes.py]

Writes (if missing) and prepares the shapes dataset, trains the config (resuming if WORKDIR has checkpoints),
evaluates COCO bbox / segm AP on the held-out val split, writes WORKDIR/eval/metrics.json and
WORKDIR/eval/predictions.png, and prints AP box / AP mask with the wall-clock time of each phase.
"""

import argparse
import json
import os
import time

os.environ.setdefault('XLA_FLAGS', '--xla_cpu_experimental_ynn_fusion_type=-reduce')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', default='runs/demo')
  parser.add_argument('--config', default='configs/shapes.py')
  parser.add_argument('--steps', type=int, default=0, help='training steps (0 = the config value)')
  parser.add_argument('--num-visualize', type=int, default=6, help='val images drawn to predictions.png')
  args = parser.parse_args(argv)

  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.WARNING)
  import jax

  from dimaskdino_jax.analysis.runner import set_num_steps
  from dimaskdino_jax.config import load_config, validate
  from dimaskdino_jax.data.prepare import ensure_shapes_dataset
  from dimaskdino_jax.evaluation.evaluator import evaluate
  from dimaskdino_jax.training.trainer import train

  times = {}
  t0 = time.time()
  config = load_config(args.config)
  if args.steps:
    set_num_steps(config, args.steps)
  validate(config, source=args.config)
  ensure_shapes_dataset(config)
  times['dataset_s'] = time.time() - t0

  t1 = time.time()
  state = train(config, args.workdir)
  times['train_s'] = time.time() - t1

  t2 = time.time()
  variables = {'params': state['params'], 'frozen_bn': state['frozen_bn']}
  metrics = evaluate(
    config, variables, out_dir=os.path.join(args.workdir, 'eval'), num_visualize=args.num_visualize, verbose=True
  )
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
    f'Pictures: {os.path.join(args.workdir, "eval", "predictions.png")}'
  )
  return summary


if __name__ == '__main__':
  main()
