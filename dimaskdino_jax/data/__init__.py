"""Data: COCO-format reading, tfds (array_record) preparation, synthetic shapes, transforms, grain pipelines.

Imports no model code. Entry points (also importable from this package; loaded lazily so that
`python -m dimaskdino_jax.data.shapes` / `.prepare` run cleanly):
  prepare.prepare_dataset(...) / `python -m dimaskdino_jax.data.prepare`   COCO dir -> prepared tfds split
  prepare.ensure_shapes_dataset(config)                                     writes + prepares shapes if missing
  pipeline.make_train_iterator(config)                                      training batches (checkpointable)
  pipeline.EvalLoader(config)                                               eval batches grouped by canvas
  tfds_builder.PreparedDataset / load_prepared(config, split)               data source, label map, COCO GT
  shapes.write_shapes_dataset(root, seed, num_train, num_val, image_size)   the synthetic dataset
"""

import importlib

_EXPORTS = {
  'DatasetError': 'coco_format',
  'LabelMap': 'coco_format',
  'load_coco_instances': 'coco_format',
  'EvalLoader': 'pipeline',
  'check_dataset': 'pipeline',
  'make_train_dataset': 'pipeline',
  'make_train_iterator': 'pipeline',
  'ensure_shapes_dataset': 'prepare',
  'prepare_dataset': 'prepare',
  'write_shapes_dataset': 'shapes',
  'PreparedDataset': 'tfds_builder',
  'is_prepared': 'tfds_builder',
  'load_prepared': 'tfds_builder',
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f'{__name__}.{_EXPORTS[name]}'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
