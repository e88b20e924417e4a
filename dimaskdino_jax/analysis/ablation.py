r"""Ablation grid (the paper's Tables 4-9): train and evaluate config overrides of one base config, print one table.

  python -m dimaskdino_jax.analysis.ablation --config configs/shapes.py --workdir runs/ablation --steps 300
  python -m dimaskdino_jax.analysis.ablation --config configs/shapes.py --workdir runs/ablation --only full no_gtg
  python -m dimaskdino_jax.analysis.ablation --config configs/dimaskdino_r50_coco.py --workdir runs/abl_r50 \
      --add 'lr_half:optim.lr=5e-5' --list

The default grid (`default_grid`, sizes derived from the base config: k1, k2, L decoder layers):
  full                    the config (DI-MaskDINO)                                    every table's reference
  no_di_no_bato           DI and BATO off, one selection of k2 (MaskDINO-like)        Table 4
  di_only / bato_only     one of the two modules                                      Table 4
  guidance_<g>            BATO guided by T_i, T_s1, T_s2 or Q_bal (default: decoder0)  Table 5
                          (Q_bal only with model.formulation='paper': in the official formulation Q_bal is
                          T_s2 itself, so guidance_Q_bal would train guidance_T_s2's model again)
  no_gtg                  BATO without guiding-token generation                       Table 6
  selections_3            three selections (k1, (k1 + k2) / 2, k2)                    Table 7
  k1_half / k2_half       half the first / the last selection                         Table 8
  decoder_<n>             L - 1 and L + 3 decoder layers                              Table 9
Each setting trains in WORKDIR/<name> (resumable; finished ones are skipped). --only picks settings by name, --add
NAME:key=value[,key=value] adds one (values are Python literals), --list prints the grid and exits. Writes
WORKDIR/results.json, WORKDIR/table.md and WORKDIR/results.png.
"""

import ast

from dimaskdino_jax import runtime  # noqa: E402

runtime.configure(restart=__name__ == '__main__')  # XLA_FLAGS; malloc tunables (a restart) as a script

import sys  # noqa: E402

from dimaskdino_jax.analysis import runner  # noqa: E402


def default_grid(config) -> list[tuple[str, str, dict]]:
  """[(name, paper table, overrides)] for the base config (see the module docstring)."""
  m = config.model
  ks = tuple(int(k) for k in m.di.selection_ks)
  k1, k2 = ks[0], ks[-1]
  layers = int(m.decoder.num_layers)
  g = int(m.bato.num_guiding_tokens)
  single = {'model.di.enabled': False, 'model.di.selection_ks': (k2,)}
  grid = [
    ('full', 'all', {}),
    ('no_di_no_bato', '4', {**single, 'model.bato.enabled': False}),
    ('di_only', '4', {'model.bato.enabled': False}),
    ('bato_only', '4', dict(single)),
    ('no_gtg', '6', {'model.bato.guiding_token_generation': False}),
  ]
  guidances = ['T_i', 'T_s1', 'T_s2']
  if m.formulation == 'paper' or m.di.random_position_tokens:  # else Q_bal == T_s2 (model.py: `guides`)
    guidances.append('Q_bal')
  grid += [(f'guidance_{x}', '5', {'model.bato.guidance': x}) for x in guidances]
  grid.append(('selections_3', '7', {'model.di.selection_ks': (k1, (k1 + k2) // 2, k2)}))
  grid.append(('k1_half', '8', {'model.di.selection_ks': (max(k2, k1 // 2), *ks[1:])}))
  half = max(1, k2 // 2)
  grid.append(
    (
      'k2_half',
      '8',
      {
        'model.di.selection_ks': (*ks[:-1], half),
        'model.decoder.num_queries': half,
        'model.bato.num_guiding_tokens': min(g, half),
      },
    )
  )
  for n in sorted({max(2, layers - 1), layers + 3} - {layers}):
    grid.append((f'decoder_{n}', '9', {'model.decoder.num_layers': n}))
  return grid


def parse_added(spec: str) -> tuple[str, dict]:
  """'NAME:key=value,key=value' -> (NAME, {key: literal value}); strings that are not literals stay strings."""
  name, sep, rest = spec.partition(':')
  if not sep or not name:
    raise ValueError(f'--add {spec!r}: expected NAME:key=value[,key=value]')
  overrides = {}
  for item in filter(None, rest.split(',')):
    key, eq, raw = item.partition('=')
    if not eq:
      raise ValueError(f'--add {spec!r}: {item!r} is not key=value')
    try:
      overrides[key.strip()] = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
      overrides[key.strip()] = raw.strip()
  return name, overrides


def _short(overrides: dict) -> str:
  return ', '.join(f'{k.split(".", 1)[-1]}={v}' for k, v in overrides.items()) or '(base config)'


def table(rows, tables: dict) -> str:
  """Markdown: setting | table | overrides | AP box | AP mask | AP50 box | AP50 mask | delta box | delta mask."""
  ref = next((r for r in rows if r['name'] == 'full'), rows[0])
  lines = []
  for r in rows:
    same = r is ref
    lines.append(
      [
        r['name'],
        tables.get(r['name'], 'added'),
        _short(r['overrides']),
        runner._fmt(r['AP_box']),
        runner._fmt(r['AP_mask']),
        runner._fmt(r['AP50_box']),
        runner._fmt(r['AP50_mask']),
        '-' if same else runner._fmt(r['AP_box'] - ref['AP_box'], signed=True),
        '-' if same else runner._fmt(r['AP_mask'] - ref['AP_mask'], signed=True),
      ]
    )
  header = ['setting', 'table', 'overrides', 'AP box', 'AP mask', 'AP50 box', 'AP50 mask', 'd box', 'd mask']
  return runner.markdown_table(header, lines)


def main(argv=None, **run_kwargs) -> dict:
  from dimaskdino_jax.config import parse_config_overrides

  parser = runner.base_parser(__doc__)
  parser.add_argument('--only', nargs='+', default=None, help='settings to run, by name (default: all)')
  parser.add_argument('--add', action='append', default=[], help='NAME:key=value[,key=value] (repeatable)')
  parser.add_argument('--list', action='store_true', help='print the settings and exit')
  args, config = parse_config_overrides(parser, sys.argv[1:] if argv is None else argv)
  grid = default_grid(config)
  try:
    grid += [(n, 'added', o) for n, o in (parse_added(s) for s in args.add)]
  except ValueError as e:
    parser.error(str(e))
  if args.only:
    unknown = sorted(set(args.only) - {n for n, _, _ in grid})
    if unknown:
      parser.error(f'--only: no setting named {unknown}; known: {[n for n, _, _ in grid]}')
    grid = [s for s in grid if s[0] in args.only]
  tables = {n: t for n, t, _ in grid}
  if args.list:
    for n, t, o in grid:
      print(f'{n:16s} table {t:5s} {_short(o)}')
    return {'settings': grid}
  rows = runner.run_settings(
    config,
    [(n, o) for n, _, o in grid],
    args.workdir,
    steps=args.steps or None,
    max_images=args.max_images,
    verbose=not args.quiet,
    **run_kwargs,
  )
  text = table(rows, tables)
  paths = runner.write_outputs(args.workdir, rows, text, {'tables': tables}, plot_title='ablations (Tables 4-9)')
  print(text, flush=True)
  if not args.quiet:
    print(f'wrote {paths["json"]}, {paths["markdown"]}, {paths["plot"]}', flush=True)
  return {'rows': rows, 'table': text, **paths}


if __name__ == '__main__':
  main()
