r"""Predict on image files with a trained DI-MaskDINO: one drawing per image and a JSON of detections.

  python predict.py --config configs/shapes.py --workdir runs/shapes --images a.jpg b.png --out runs/shapes/pred
  python predict.py --config configs/dimaskdino_r50_coco.py --checkpoint runs/r50/checkpoints/90000 \
      --images photos/*.jpg --out preds --score-threshold 0.5 --config.eval.batch_size=4

--workdir uses the newest complete checkpoint of WORKDIR/checkpoints; --checkpoint takes a step directory (or a
checkpoints directory / workdir: its newest step). Writes OUT/<name>.png (masks, boxes, class names and scores of the
detections with score >= --score-threshold), OUT/detections.json (COCO result format, RLE masks) and OUT/images.json.
Class names and COCO category ids come from the config's prepared dataset when it exists. Missing or unreadable files
are skipped, counted and named in the summary (exit status 1 when no image could be read). Any config field can be
overridden with --config.a.b=value. Runs on whatever JAX finds (CPU or GPU); one compilation per canvas.
"""

from dimaskdino_jax import runtime  # noqa: E402

runtime.configure(restart=__name__ == '__main__')  # XLA_FLAGS; malloc tunables (a restart) as a script

import sys  # noqa: E402

from dimaskdino_jax.config import checkpoint_cli_parser, parse_config_overrides  # noqa: E402


def main(argv=None) -> dict:
  parser = checkpoint_cli_parser(__doc__, 'uses')
  parser.add_argument('--images', nargs='+', required=True, help='image files (any format PIL reads)')
  parser.add_argument('--out', required=True, help='output directory')
  parser.add_argument('--score-threshold', type=float, default=0.3, help='detections drawn and written (>=)')
  parser.add_argument('--batch-size', type=int, default=0, help='images per call (default config.eval.batch_size)')
  parser.add_argument('--no-draw', action='store_true', help='write the JSON files only')
  parser.add_argument('--quiet', action='store_true', help='no progress bar or summary')
  args, config = parse_config_overrides(parser, sys.argv[1:] if argv is None else argv)

  from dimaskdino_jax.evaluation.inference import Predictor, class_info, predict_files
  from dimaskdino_jax.training.checkpoint import restore_for_cli

  step_dir, step, variables = restore_for_cli(config, args.workdir, args.checkpoint)
  names, ids, source = class_info(config)
  if not args.quiet:
    print(f'predicting with {step_dir} (step {step}); classes from {source}', flush=True)
  predictor = Predictor(config, variables, batch_size=args.batch_size or None)
  report = predict_files(
    predictor,
    args.images,
    args.out,
    score_threshold=args.score_threshold,
    class_names=names,
    category_ids=ids,
    draw=not args.no_draw,
    verbose=not args.quiet,
  )
  if not report['images']:
    raise SystemExit(f'error: none of the {len(args.images)} images could be read (see {args.out}/images.json)')
  return report


if __name__ == '__main__':
  main()
