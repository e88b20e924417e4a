r"""Imbalance tolerance (the paper's Table 3): how much AP box / AP mask drop when detection is handicapped.

  python -m dimaskdino_jax.analysis.imbalance --config configs/shapes.py --workdir runs/table3 --steps 300
  python -m dimaskdino_jax.analysis.imbalance --config configs/dimaskdino_r50_coco.py --workdir runs/table3_r50

Trains three settings of the config, each in WORKDIR/<name> (resumable; finished settings are skipped):
  standard        the config as is
  det_weight_0.1  loss.detection_weight_scale = 0.1 (class, box and GIoU loss weights x 0.1)
  random_pos      model.di.random_position_tokens = True (random position tokens for Q_bal)
then prints AP box and AP mask with their relative drops from the standard setting (percent of the standard AP), and
writes WORKDIR/results.json, WORKDIR/table.md and WORKDIR/results.png. --config.a.b=value overrides the base config.
"""

from dimaskdino_jax import runtime  # noqa: E402

runtime.configure(restart=__name__ == '__main__')  # XLA_FLAGS; malloc tunables (a restart) as a script

import sys  # noqa: E402

from dimaskdino_jax.analysis import runner  # noqa: E402

SETTINGS = (
  ('standard', {}),
  ('det_weight_0.1', {'loss.detection_weight_scale': 0.1}),
  ('random_pos', {'model.di.random_position_tokens': True}),
)


def table(rows) -> str:
  """Markdown: setting | AP box | drop box | AP mask | drop mask (drops relative to the first row, in percent)."""
  ref = rows[0]
  lines = []
  for r in rows:
    first = r is ref
    lines.append(
      [
        r['name'],
        runner._fmt(r['AP_box']),
        '-' if first else runner._fmt(runner.relative_drop(r['AP_box'], ref['AP_box']), signed=True) + ' %',
        runner._fmt(r['AP_mask']),
        '-' if first else runner._fmt(runner.relative_drop(r['AP_mask'], ref['AP_mask']), signed=True) + ' %',
      ]
    )
  return runner.markdown_table(['setting', 'AP box', 'rel. drop box', 'AP mask', 'rel. drop mask'], lines)


def main(argv=None, **run_kwargs) -> dict:
  from dimaskdino_jax.config import parse_config_overrides

  parser = runner.base_parser(__doc__)
  args, config = parse_config_overrides(parser, sys.argv[1:] if argv is None else argv)
  rows = runner.run_settings(
    config,
    SETTINGS,
    args.workdir,
    steps=args.steps or None,
    max_images=args.max_images,
    verbose=not args.quiet,
    **run_kwargs,
  )
  ref = rows[0]
  drops = {
    r['name']: {
      'box': runner.relative_drop(r['AP_box'], ref['AP_box']),
      'mask': runner.relative_drop(r['AP_mask'], ref['AP_mask']),
    }
    for r in rows[1:]
  }
  text = table(rows)
  paths = runner.write_outputs(
    args.workdir, rows, text, {'relative_drop_percent': drops}, plot_title='imbalance tolerance (Table 3)'
  )
  print(text, flush=True)
  if not args.quiet:
    print(f'wrote {paths["json"]}, {paths["markdown"]}, {paths["plot"]}', flush=True)
  return {'rows': rows, 'relative_drop_percent': drops, 'table': text, **paths}


if __name__ == '__main__':
  main()
