r"""Evaluate a DI-MaskDINO checkpoint with COCO bbox / segm AP.

  python eval.py --config configs/shapes.py --workdir runs/shapes
  python eval.py --config configs/dimaskdino_r50_coco.py:24ep --checkpoint runs/r50/checkpoints/90000
  python eval.py --config configs/shapes.py --workdir runs/shapes --mode exact --per-layer --max-images 50 \
      --out runs/shapes/eval_exact --config.eval.batch_size=4

--workdir evaluates the newest complete checkpoint in WORKDIR/checkpoints; --checkpoint takes a step directory
(or a checkpoints directory / workdir: its newest step); `--workdir WORKDIR --checkpoint best` evaluates the best
checkpoint kept by the evaluation during training (train.eval_every; WORKDIR/best). Metrics go to OUT/metrics.json
(default WORKDIR/eval, WORKDIR/eval_best for the best; for --checkpoint the workdir holding its checkpoints/
directory) with a grid of a few predictions in OUT/predictions.png.
--per-layer adds OUT/per_layer.png: AP box and AP mask of every decoder layer and the imbalance at the first and the
final layer (the paper's Fig. 1).
Several hosts: run the same command on every host with --coordinator_address=HOST0:PORT --num_processes=N
--process_id=I (or the JAX_* environment variables, or under SLURM's srun; README, "Scaling out"): each process
evaluates its share of the images, process 0 gathers the detections, runs the COCO evaluation and writes OUT.
Any config field can be overridden with --config.a.b=value (Python literals: 4, 2e-4, '((800, 1333),)', True).
The shapes config writes and prepares its synthetic dataset when it is missing.
"""

import os

from dimaskdino_jax import runtime  # noqa: E402

runtime.configure(restart=__name__ == '__main__')  # XLA_FLAGS; malloc tunables (a restart) as a script

import sys  # noqa: E402

from dimaskdino_jax.config import checkpoint_cli_parser, parse_config_overrides  # noqa: E402

PER_LAYER_PLOT = 'per_layer.png'  # --per-layer: AP box / AP mask per decoder layer (the paper's Fig. 1)


BEST = 'best'  # --checkpoint best: WORKDIR/best (training/periodic_eval.py)


def best_checkpoint_argv(argv):
  """argv with `--workdir W --checkpoint best` turned into `--checkpoint W/best`; `--checkpoint best` needs
  --workdir."""
  argv = list(argv)

  def value_of(flag):
    for i, a in enumerate(argv):
      if a == flag and i + 1 < len(argv):
        return i, 2, argv[i + 1]
      if a.startswith(flag + '='):
        return i, 1, a.split('=', 1)[1]
    return None

  ckpt = value_of('--checkpoint')
  if ckpt is None or ckpt[2] != BEST:
    return argv
  workdir = value_of('--workdir')
  if workdir is None:
    raise SystemExit('error: --checkpoint best needs --workdir WORKDIR (the run whose WORKDIR/best to evaluate)')
  path = os.path.join(workdir[2], BEST)
  for i, n, _ in sorted([ckpt, workdir], reverse=True):
    del argv[i : i + n]
  return [*argv, '--checkpoint', path]


def parse_args(argv):
  """(argparse namespace, config with --config.a.b overrides applied and validated)."""
  argv = best_checkpoint_argv(argv)
  parser = checkpoint_cli_parser(__doc__, 'evaluates')
  parser.add_argument('--split', default=None, help='prepared split (default config.data.val_split)')
  parser.add_argument('--mode', default='buckets', choices=('buckets', 'exact'), help='canvas buckets or exact sizes')
  parser.add_argument('--per-layer', action='store_true', help='also evaluate the initial prediction and every layer')
  parser.add_argument('--max-images', type=int, default=None, help='evaluate the first N images only')
  parser.add_argument('--num-visualize', type=int, default=4, help='images drawn in OUT/predictions.png (0: none)')
  parser.add_argument('--out', default=None, help='output directory (default WORKDIR/eval)')
  parser.add_argument('--quiet', action='store_true', help='no progress bar or COCO summaries')
  parser.add_argument('--coordinator_address', default=None, help='multi-host: HOST:PORT of process 0')
  parser.add_argument('--num_processes', type=int, default=None, help='multi-host: number of processes')
  parser.add_argument('--process_id', type=int, default=None, help='multi-host: this process, 0 .. N - 1')
  return parse_config_overrides(parser, argv)


def default_out_dir(args, step_dir: str) -> str:
  if args.out:
    return args.out
  if args.workdir:
    return os.path.join(args.workdir, 'eval')
  parent = os.path.dirname(step_dir)
  if os.path.basename(parent) == 'checkpoints':
    return os.path.join(os.path.dirname(parent), 'eval')
  if os.path.basename(parent) == BEST:
    return os.path.join(os.path.dirname(parent), 'eval_best')
  raise SystemExit(f'error: cannot tell the workdir of {step_dir}; pass --out DIR')


def restore_newest(checkpoints, config, args, verbose=True, attempts=3):
  """(step_dir, step, variables) of the checkpoint to evaluate; safe on the workdir of a live training run.

  Only complete checkpoints are listed (orbax renames `<step>.orbax-checkpoint-tmp` to `<step>` when a write is
  done). The trainer deletes old checkpoints as it writes new ones (train.keep_checkpoints): when the step directory
  disappears while it is being read, the newest complete checkpoint is resolved and read again.
  """
  for attempt in range(attempts):
    try:
      step_dir, step = checkpoints.resolve_checkpoint(workdir=args.workdir, checkpoint=args.checkpoint)
    except FileNotFoundError as e:
      raise SystemExit(f'error: {e}') from None
    try:
      return step_dir, step, checkpoints.restore_variables(config, step_dir)
    except Exception as e:  # the step may have been deleted mid-read: decided below, else re-raised
      if not os.path.isdir(step_dir) and attempt + 1 < attempts:
        if verbose:
          print(f'{step_dir} was deleted while being read (a newer checkpoint replaced it); retrying', flush=True)
        continue
      if isinstance(e, ValueError | FileNotFoundError):
        raise SystemExit(f'error: {e}') from None
      raise
  raise AssertionError('unreachable')


def main(argv=None) -> dict:
  args, config = parse_args(sys.argv[1:] if argv is None else argv)
  import jax

  from dimaskdino_jax.training import sharding

  try:  # before any other jax call
    sharding.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
  except sharding.MeshError as e:
    raise SystemExit(f'error: {e}') from None
  from dimaskdino_jax.data.prepare import ensure_shapes_dataset
  from dimaskdino_jax.evaluation import evaluator
  from dimaskdino_jax.training import checkpoint as checkpoints

  step_dir, step, variables = restore_newest(checkpoints, config, args, verbose=not args.quiet)
  out_dir = default_out_dir(args, step_dir)
  if jax.process_index() == 0:
    ensure_shapes_dataset(config, verbose=not args.quiet)
  if jax.process_count() > 1:  # the others wait for process 0 to write the synthetic dataset
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices('dimaskdino_eval_dataset_ready')
  if not args.quiet:
    print(f'evaluating {step_dir} (step {step})', flush=True)
  metrics = evaluator.evaluate(
    config,
    variables,
    split=args.split,
    mode=args.mode,
    per_layer=args.per_layer,
    max_images=args.max_images,
    out_dir=out_dir,
    verbose=not args.quiet,
    num_visualize=args.num_visualize,
  )
  if args.per_layer and isinstance(metrics, dict) and 'per_layer' in metrics and jax.process_index() == 0:
    from dimaskdino_jax.analysis.plots import plot_per_layer

    path = plot_per_layer(
      metrics['per_layer'], os.path.join(out_dir, PER_LAYER_PLOT), title=f'{config.name}, step {step}'
    )
    if not args.quiet:
      print(f'wrote {path}', flush=True)
  return metrics


if __name__ == '__main__':
  main()
