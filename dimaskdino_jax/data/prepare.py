"""Prepare a COCO-format dataset split for training/evaluation, and the synthetic shapes dataset on demand.

  python -m dimaskdino_jax.data.prepare --format coco --images coco/train2017 \
      --annotations coco/annotations/instances_train2017.json --name coco2017_train
  python -m dimaskdino_jax.data.prepare --format coco --images coco/val2017 \
      --annotations coco/annotations/instances_val2017.json --name coco2017 --split val --data-dir data

Writes `DATA_DIR/NAME/SPLIT/1.0.0/` (see tfds_builder.py; --data-dir defaults to `data`, the configs'
data.data_dir) and prints what was kept, skipped and repaired, by reason, and the number of classes to give the
config. Without --split, a name ending in `_SPLIT` (letters and digits after the last `_`, e.g. `coco2017_train`,
`bdd100k_val`) is read as NAME_SPLIT: `--name coco2017_train` = `--name coco2017 --split train`, which is what
`configs/dimaskdino_r50_coco.py` reads (data.name 'coco2017', data.train_split 'train', data.val_split 'val').
Any COCO-format dataset works the same way (BDD100K's COCO-format export, custom data, detection-only files).
`ensure_shapes_dataset(config)` generates and prepares the shapes dataset when config.data.name == 'shapes'
and it is missing, so that `train.py --config configs/shapes.py` works on a fresh clone.
"""

import argparse
import os
import re
import time

from dimaskdino_jax.data import coco_format, shapes, tfds_builder

FORMATS = ('coco',)
SHAPES_NAME = 'shapes'
SHAPES_SEED = 0  # the shapes dataset is the same whatever the training seed
SHAPES_NUM_TRAIN = 2000
SHAPES_NUM_VAL = 200
DEFAULT_DATA_DIR = 'data'
_NAME_SPLIT_RE = re.compile(r'^(.+)_([A-Za-z0-9]+)$')


def split_name(name: str, split: str | None) -> tuple[str, str]:
  """(dataset name, split): `split` when given, else NAME_SPLIT parsed from `name` (DatasetError if it is not)."""
  if split:
    return name, split
  match = _NAME_SPLIT_RE.match(name)
  if not match:
    raise coco_format.DatasetError(
      f'--name {name!r}: give --split, or a name ending in _SPLIT such as {name}_train (read as --name {name} '
      '--split train)'
    )
  return match.group(1), match.group(2)


def prepare_dataset(
  images: str,
  annotations: str,
  name: str,
  split: str,
  data_dir: str,
  *,
  fmt: str = 'coco',
  overwrite: bool = False,
  check_files: bool = True,
  verbose: bool = True,
) -> tfds_builder.PreparedDataset:
  """Reads a COCO-format split (images dir + instances json) and writes it as a tfds array_record dataset."""
  if fmt not in FORMATS:
    raise coco_format.DatasetError(f'--format {fmt!r}: only {FORMATS} is supported')
  if not os.path.isdir(images):
    raise coco_format.DatasetError(f'{images}: image directory not found (--images)')
  if tfds_builder.is_prepared(data_dir, name, split) and not overwrite:
    if verbose:
      print(f'{tfds_builder.dataset_dir(data_dir, name, split)}: already prepared (pass --overwrite to redo)')
    return tfds_builder.PreparedDataset(data_dir, name, split)
  start = time.time()
  coco = coco_format.load_coco_instances(annotations, images, check_files=check_files, verbose=verbose)
  path = tfds_builder.build_dataset(coco, name, split, data_dir, overwrite=True)
  if verbose:
    print(f'prepared {len(coco.images)} images of {name}/{split} in {path} ({time.time() - start:.1f}s)', flush=True)
    kind = '' if coco.has_masks else ' --config.loss.mask_losses=False --config.model.decoder.box_init=none'
    print(
      f'train on it with --config.data.name={name} --config.data.data_dir={data_dir} '
      f'--config.model.num_classes={coco.label_map.num_classes}{kind}',
      flush=True,
    )
  return tfds_builder.PreparedDataset(data_dir, name, split)


def ensure_shapes_dataset(
  config, *, num_train: int = SHAPES_NUM_TRAIN, num_val: int = SHAPES_NUM_VAL, verbose: bool = True
) -> bool:
  """When config.data.name == 'shapes', writes and prepares any missing split; returns True if it did work.

  The raw COCO files go to DATA_DIR/shapes_raw/ (train/, val/, annotations/); the prepared splits
  config.data.train_split and config.data.val_split come from its 'train' and 'val' parts.
  """
  d = config.data
  if d.name != SHAPES_NAME:
    return False
  splits = {d.train_split: 'train', d.val_split: 'val'}
  missing = [s for s in splits if not tfds_builder.is_prepared(d.data_dir, d.name, s)]
  if not missing:
    return False
  raw = os.path.join(d.data_dir, 'shapes_raw')
  start = time.time()
  if not all(os.path.isfile(os.path.join(raw, 'annotations', f'instances_{s}.json')) for s in ('train', 'val')):
    if verbose:
      print(f'writing the synthetic shapes dataset ({num_train} train / {num_val} val images) to {raw}', flush=True)
    shapes.write_shapes_dataset(raw, SHAPES_SEED, num_train, num_val, int(d.image_size))
  for split in missing:
    source = splits[split]
    prepare_dataset(
      os.path.join(raw, source),
      os.path.join(raw, 'annotations', f'instances_{source}.json'),
      d.name,
      split,
      d.data_dir,
      overwrite=True,
      verbose=verbose,
    )
  if verbose:
    print(f'shapes dataset ready under {d.data_dir} ({time.time() - start:.1f}s)', flush=True)
  return True


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description='Prepare a COCO-format split as a tfds array_record dataset.')
  parser.add_argument('--images', required=True, help='directory of the images (file_name is relative to it)')
  parser.add_argument('--annotations', required=True, help='COCO instances json')
  parser.add_argument('--name', required=True, help='dataset name (config.data.name), or NAME_SPLIT without --split')
  parser.add_argument('--split', default=None, help='split name (config.data.train_split / val_split)')
  parser.add_argument('--data-dir', default=DEFAULT_DATA_DIR, help='output root (config.data.data_dir)')
  parser.add_argument('--format', default='coco', choices=FORMATS, help='annotation format')
  parser.add_argument('--overwrite', action='store_true', help='rebuild an already prepared split')
  parser.add_argument(
    '--no-check-files', action='store_true', help='do not decode every image (only missing files are skipped)'
  )
  args = parser.parse_args(argv)
  try:
    name, split = split_name(args.name, args.split)
    prepare_dataset(
      args.images,
      args.annotations,
      name,
      split,
      args.data_dir,
      fmt=args.format,
      overwrite=args.overwrite,
      check_files=not args.no_check_files,
    )
  except coco_format.DatasetError as e:
    raise SystemExit(f'error: {e}') from None


if __name__ == '__main__':
  main()
