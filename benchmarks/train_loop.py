"""Steps per second of the trainer's own loop on a CPU presented as 1, 2, ... XLA host devices.

  python benchmarks/train_loop.py --config configs/shapes.py --steps 400 --devices 1,2 [--json FILE] [--config.a.b=v]

For each device count a fresh process (the device count is fixed when jax starts) sets
`XLA_FLAGS=--xla_force_host_platform_device_count=N`, trains the config for --steps steps with
`dimaskdino_jax.training.trainer.train` in a temporary work directory (the real input pipeline, host matching,
data-parallel step, logging and checkpointing; the dataset is generated first if missing, like the demo) and reports
the mean of the logged `steps_per_sec` over the log intervals after the first (which includes compilation) and
before the last (which includes the final checkpoint), and the wall-clock seconds of the whole run. The counts run
one after the other, so compare them within one invocation: the machine's speed drifts by the hour.
Writes {"<devices>": {"steps_per_sec": .., "train_s": .., "intervals": ..}} to --json.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from dimaskdino_jax import runtime  # noqa: E402

runtime.configure(restart=__name__ == '__main__')  # the malloc tunables (a restart), which the children inherit
BASE_FLAGS = runtime.XLA_CPU_FLAGS


def worker(config, steps: int) -> dict:
  """Runs in the child process: trains the (overridden, validated) config and returns the figures."""
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.WARNING)
  import jax

  from dimaskdino_jax.analysis.runner import set_num_steps
  from dimaskdino_jax.data.prepare import ensure_shapes_dataset
  from dimaskdino_jax.training.trainer import train

  set_num_steps(config, steps)
  config.train.log_every = min(int(config.train.log_every), max(1, steps // 8))
  ensure_shapes_dataset(config)
  workdir = tempfile.mkdtemp(prefix='train_loop_')
  try:
    t0 = time.time()
    train(config, workdir, verbose=False)
    train_s = time.time() - t0
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      rates = [json.loads(line)['steps_per_sec'] for line in f if '"steps_per_sec"' in line]
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  if len(rates) < 3:
    raise SystemExit(f'train_loop: only {len(rates)} logged intervals; raise --steps (at least 3 are needed)')
  inner = rates[1:-1]
  return {
    'devices': jax.device_count(),
    'steps_per_sec': sum(inner) / len(inner),
    'train_s': train_s,
    'intervals': len(inner),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', default='configs/shapes.py')
  parser.add_argument('--steps', type=int, default=400)
  parser.add_argument('--devices', default='1,2', help='comma-separated XLA host device counts')
  parser.add_argument('--json', default=None, help='where to write the figures')
  parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  argv = sys.argv[1:] if argv is None else list(argv)
  from dimaskdino_jax.config import parse_config_overrides

  # --config.a.b=value overrides, checked here before any child starts and passed on to each child unchanged.
  args, config = parse_config_overrides(parser, argv)
  if args.worker:
    print('RESULT ' + json.dumps(worker(config, args.steps)), flush=True)
    return None
  overrides = parser.parse_known_args(argv)[1]
  try:
    counts = [int(x) for x in args.devices.split(',') if x]
  except ValueError:
    parser.error(f'--devices: expected comma-separated integers, got {args.devices!r}')
  if not counts or min(counts) < 1:
    parser.error(f'--devices: device counts must be >= 1, got {args.devices!r}')
  results = {}
  for n in counts:
    env = dict(os.environ, XLA_FLAGS=f'{BASE_FLAGS} --xla_force_host_platform_device_count={n}')
    cmd = [sys.executable, os.path.abspath(__file__), '--worker', '--config', args.config, '--steps', str(args.steps)]
    cmd += overrides
    proc = subprocess.run(cmd, env=env, cwd=os.getcwd(), capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith('RESULT ')]
    if proc.returncode != 0 or not lines:
      sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
      raise SystemExit(f'train_loop: the run with {n} device(s) failed (exit {proc.returncode})')
    r = json.loads(lines[-1][len('RESULT ') :])
    results[str(n)] = r
    print(f'{n} device(s): {r["steps_per_sec"]:.2f} steps/s ({r["intervals"]} intervals), run {r["train_s"]:.0f} s')
  print()
  print(
    f'| devices | steps/s | train s |  ({args.config}, {args.steps} steps, {os.cpu_count()} CPUs, '
    f'malloc: {runtime.describe_malloc()})'
  )
  print('|---|---|---|')
  for n, r in results.items():
    print(f'| {n} | {r["steps_per_sec"]:.2f} | {r["train_s"]:.0f} |')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)
    print(f'wrote {args.json}')
  return results


if __name__ == '__main__':
  main()
