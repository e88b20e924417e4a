r"""Fine-tuning on your own COCO-format data, measured: from a checkpoint with another class set vs from scratch.

  python -m dimaskdino_jax.analysis.finetune --config configs/shapes.py --workdir runs/finetune \
      --pretrain-steps 300 --steps 150 --eval-every 50 [--max-images 100] [--config.a.b=value ...]

1. `pretrain`: trains the config on the shapes data (3 classes: circle, square, triangle) for --pretrain-steps.
2. `dataset`: writes a COCO-format dataset of its own from the shapes generator with another seed (other images)
   and another class set: circle renamed 'disk', square and triangle merged into 'polygon' (2 classes), and
   prepares it as WORKDIR/data/shapes_polygons/{train,val}.
3. `finetune`: model.num_classes = 2, train.init_checkpoint = the pretrained run, train.init_class_map =
   'circle,square' (the disk row of the class heads starts from the circle row, polygon from square; every other
   weight that fits is loaded), evaluated every --eval-every steps during training (train.eval_every).
   `scratch`: the same run without the checkpoint.
4. Prints and writes (WORKDIR/results.json, WORKDIR/table.md) AP box / AP mask of both at every evaluation.

Each run resumes when interrupted and is skipped when finished (its metrics.jsonl is read back).
"""

import os

from dimaskdino_jax import runtime  # noqa: E402

runtime.configure(restart=__name__ == '__main__')  # XLA_FLAGS; malloc tunables (a restart) as a script

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from dimaskdino_jax.analysis import runner  # noqa: E402

NAME = 'shapes_polygons'
SEED = 1  # the pretraining data uses seed 0 (data/prepare.py SHAPES_SEED)
CLASSES = ({'id': 1, 'name': 'disk'}, {'id': 2, 'name': 'polygon'})
RELABEL = {1: 1, 3: 2, 7: 2}  # shapes category id -> new id: circle -> disk, square and triangle -> polygon
CLASS_MAP = 'circle,square'  # the checkpoint's class whose rows start each new class (train.init_class_map)


def relabel(coco: dict) -> dict:
  """A shapes COCO dict with its categories renamed and merged (RELABEL, CLASSES)."""
  out = dict(coco)
  out['categories'] = [dict(c, supercategory='shape') for c in CLASSES]
  out['annotations'] = [dict(a, category_id=RELABEL[a['category_id']]) for a in coco['annotations']]
  return out


def write_dataset(data_dir: str, num_train: int, num_val: int, image_size: int, verbose: bool = True) -> str:
  """Writes and prepares the relabelled dataset DATA_DIR/shapes_polygons/{train,val} (once); returns DATA_DIR."""
  from dimaskdino_jax.data import prepare, shapes
  from dimaskdino_jax.data.tfds_builder import is_prepared

  if all(is_prepared(data_dir, NAME, s) for s in ('train', 'val')):
    return data_dir
  raw = os.path.join(data_dir, f'{NAME}_raw')
  paths = shapes.write_shapes_dataset(raw, SEED, num_train, num_val, image_size)
  for split, path in paths.items():
    with open(path) as f:
      coco = relabel(json.load(f))
    with open(path, 'w') as f:
      json.dump(coco, f)
    prepare.prepare_dataset(os.path.join(raw, split), path, NAME, split, data_dir, overwrite=True, verbose=verbose)
  return data_dir


def run_configs(base, workdir, *, pretrain_steps, steps, eval_every, max_images):
  """{'pretrain', 'finetune', 'scratch'}: the configs of the three runs (validated)."""
  from dimaskdino_jax.config import validate

  pre = base.copy_and_resolve_references()
  pre.train.num_steps = int(pretrain_steps)
  pre.train.checkpoint_every = int(pretrain_steps)
  validate(pre, source='finetune: pretrain')
  out = {'pretrain': pre}
  for name in ('finetune', 'scratch'):
    c = base.copy_and_resolve_references()
    c.model.num_classes = len(CLASSES)
    c.data.name = NAME
    c.data.data_dir = os.path.join(os.path.abspath(workdir), 'data')
    c.data.train_split, c.data.val_split = 'train', 'val'
    c.train.num_steps = int(steps)
    c.train.checkpoint_every = int(steps)
    c.train.eval_every = int(eval_every)
    c.train.eval_max_images = int(max_images or 0)
    if name == 'finetune':
      c.train.init_checkpoint = os.path.join(os.path.abspath(workdir), 'pretrain')
      c.train.init_class_map = CLASS_MAP
    validate(c, source=f'finetune: {name}')
    out[name] = c
  return out


def eval_curve(workdir) -> dict[int, dict]:
  """step -> {'AP_box', 'AP_mask'} of the evaluations during training in WORKDIR/metrics.jsonl."""
  from dimaskdino_jax.training.writers import read_metrics

  return {
    int(r['step']): {'AP_box': r['eval/bbox_AP'], 'AP_mask': r.get('eval/segm_AP', float('nan'))}
    for r in read_metrics(workdir)
    if 'eval/bbox_AP' in r
  }


def table(curves: dict) -> str:
  steps = sorted(set(curves['finetune']) | set(curves['scratch']))
  rows = []
  for s in steps:
    f, z = curves['finetune'].get(s, {}), curves['scratch'].get(s, {})
    cells = [f.get('AP_box'), z.get('AP_box'), f.get('AP_mask'), z.get('AP_mask')]
    rows.append([str(s)] + [runner._fmt(v) if v is not None else '-' for v in cells])
  header = ['step', 'AP box, checkpoint', 'AP box, scratch', 'AP mask, checkpoint', 'AP mask, scratch']
  return runner.markdown_table(header, rows)


def run(base, workdir, *, pretrain_steps, steps, eval_every, max_images=None, num_train=400, num_val=50, verbose=True):
  """The three runs (module docstring); returns {'curves': {...}, 'seconds': {...}, 'table': markdown}."""
  from dimaskdino_jax.data.prepare import ensure_shapes_dataset
  from dimaskdino_jax.training.trainer import train

  configs = run_configs(
    base, workdir, pretrain_steps=pretrain_steps, steps=steps, eval_every=eval_every, max_images=max_images
  )
  ensure_shapes_dataset(configs['pretrain'], verbose=verbose)
  write_dataset(configs['finetune'].data.data_dir, num_train, num_val, int(base.data.image_size), verbose=verbose)
  seconds = {}
  for name in ('pretrain', 'finetune', 'scratch'):
    start = time.time()
    train(configs[name], os.path.join(workdir, name), verbose=verbose)
    seconds[name] = round(time.time() - start, 1)
  curves = {name: eval_curve(os.path.join(workdir, name)) for name in ('finetune', 'scratch')}
  result = {'curves': curves, 'seconds': seconds, 'table': table(curves)}
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(workdir, 'table.md'), 'w') as f:
    f.write(result['table'] + '\n')
  return result


def main(argv=None) -> dict:
  import argparse

  from dimaskdino_jax.config import parse_config_overrides

  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', required=True, help='configs/NAME.py (a shapes-sized model)')
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--pretrain-steps', type=int, default=300)
  parser.add_argument('--steps', type=int, default=150, help='fine-tuning / from-scratch steps')
  parser.add_argument('--eval-every', type=int, default=50)
  parser.add_argument('--max-images', type=int, default=0, help='val images per evaluation (0 = all)')
  parser.add_argument('--num-train', type=int, default=400, help='train images of the relabelled dataset')
  parser.add_argument('--num-val', type=int, default=50, help='val images of the relabelled dataset')
  parser.add_argument('--quiet', action='store_true')
  args, base = parse_config_overrides(parser, sys.argv[1:] if argv is None else argv)
  result = run(
    base,
    args.workdir,
    pretrain_steps=args.pretrain_steps,
    steps=args.steps,
    eval_every=args.eval_every,
    max_images=args.max_images,
    num_train=args.num_train,
    num_val=args.num_val,
    verbose=not args.quiet,
  )
  print(result['table'])
  print(f'seconds: {result["seconds"]}')
  return result


if __name__ == '__main__':
  main()
