"""Any COCO-format directory -> a tfds dataset in array_record files (no TensorFlow), and the read side.

Layout: `data_dir/NAME/SPLIT/1.0.0/` holds the tfds files (`dataset_info.json`, `features.json`,
`metadata.json`, `NAME-SPLIT.array_record-*`) and `instances.json`, the cleaned COCO ground truth of that split
(exactly the kept images and annotations, segmentations as the stored RLEs) that evaluation uses. Each split is
prepared on its own (one tfds builder config per split), so train and val can be prepared separately.

One record per image, in image-id order (shuffling is disabled at write time, so record index i is the i-th
image of the sorted ids, and `index` in the metadata describes record i without decoding it):

  image      bytes            the image file as stored (JPEG/PNG), not re-encoded
  image_id   int64
  file_name  bytes
  height     int32            original size
  width      int32
  boxes      float32 (N, 4)   x0, y0, x1, y1 in original pixels (the json's bbox)
  labels     int32 (N,)       contiguous labels 0..C-1 (sorted category ids)
  is_crowd   bool (N,)        crowd regions are kept; training drops them, evaluation needs them
  area       float32 (N,)     the json's area
  ann_ids    int64 (N,)
  masks      bytes (N,)       compressed COCO RLE counts; each mask's size is (height, width); b'' in a
                              detection-only dataset (metadata has_masks False)

An image whose EXIF orientation applies (coco_format.check_image_file) is stored re-encoded as PNG with the
orientation baked in, so the stored pixels are always what the json's height/width and annotations describe.

The builder metadata (`builder.info.metadata`, i.e. metadata.json) holds the label map (category ids and names),
the categories, has_masks, the source paths, the skip and repair summaries and the per-record index (image_id,
height, width, num_instances, num_noncrowd). Read back with `PreparedDataset(data_dir, name, split)`.
"""

import contextlib
import io
import json
import os
import re
import shutil
import tempfile

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageOps

from dimaskdino_jax.data.coco_format import CocoDataset, DatasetError, LabelMap

VERSION = '1.0.0'
GT_FILE = 'instances.json'
_NAME_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]*$')
_SPLIT_RE = re.compile(r'^[A-Za-z0-9_]+$')
_PNG_MODES = ('1', 'L', 'LA', 'I', 'I;16', 'P', 'RGB', 'RGBA')


def features() -> tfds.features.FeaturesDict:
  """The record schema (numpy dtypes only: no TensorFlow needed)."""
  return tfds.features.FeaturesDict(
    {
      'image': tfds.features.Tensor(shape=(), dtype=np.object_),
      'image_id': tfds.features.Scalar(dtype=np.int64),
      'file_name': tfds.features.Tensor(shape=(), dtype=np.object_),
      'height': tfds.features.Scalar(dtype=np.int32),
      'width': tfds.features.Scalar(dtype=np.int32),
      'boxes': tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
      'labels': tfds.features.Tensor(shape=(None,), dtype=np.int32),
      'is_crowd': tfds.features.Tensor(shape=(None,), dtype=np.bool_),
      'area': tfds.features.Tensor(shape=(None,), dtype=np.float32),
      'ann_ids': tfds.features.Tensor(shape=(None,), dtype=np.int64),
      'masks': tfds.features.Tensor(shape=(None,), dtype=np.object_),
    }
  )


def _metadata(coco: CocoDataset) -> dict:
  return {
    'label_map': coco.label_map.to_json(),
    'categories': coco.categories,
    'has_masks': bool(coco.has_masks),
    'source': {'annotation_file': os.path.abspath(coco.annotation_file), 'image_dir': os.path.abspath(coco.image_dir)},
    'skipped': {'images': coco.skipped_images.to_json(), 'annotations': coco.skipped_annotations.to_json()},
    'repaired': {'images': coco.repaired_images.to_json(), 'annotations': coco.repaired_annotations.to_json()},
    'index': {
      'image_id': [r.image_id for r in coco.images],
      'height': [r.height for r in coco.images],
      'width': [r.width for r in coco.images],
      'num_instances': [len(r.annotations) for r in coco.images],
      'num_noncrowd': [r.num_noncrowd for r in coco.images],
    },
  }


def _image_bytes(record) -> bytes:
  """The file's bytes, or a PNG of its pixels with the EXIF orientation applied (record.exif_transpose)."""
  if not record.exif_transpose:
    with open(record.path, 'rb') as f:
      return f.read()
  with Image.open(record.path) as im:
    oriented = ImageOps.exif_transpose(im)
    if oriented.mode not in _PNG_MODES:  # e.g. CMYK: PNG cannot store it; decode_image would convert it anyway
      oriented = oriented.convert('RGB')
    buf = io.BytesIO()
    oriented.save(buf, 'PNG')
  return buf.getvalue()


def _example(record) -> dict:
  image_bytes = _image_bytes(record)
  anns = record.annotations
  return {
    'image': image_bytes,
    'image_id': record.image_id,
    'file_name': record.file_name.encode('utf-8'),
    'height': record.height,
    'width': record.width,
    'boxes': np.array(
      [[a.bbox[0], a.bbox[1], a.bbox[0] + a.bbox[2], a.bbox[1] + a.bbox[3]] for a in anns], np.float32
    ).reshape(-1, 4),
    'labels': np.array([a.label for a in anns], np.int32),
    'is_crowd': np.array([a.iscrowd for a in anns], np.bool_),
    'area': np.array([a.area for a in anns], np.float32),
    'ann_ids': np.array([a.ann_id for a in anns], np.int64),
    'masks': np.array([b'' if a.rle is None else a.rle['counts'].encode('ascii') for a in anns], dtype=np.object_),
  }


class _CocoInstancesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Builds one split of a COCO-format dataset; the split is the builder config name."""

  VERSION = tfds.core.Version(VERSION)

  def __init__(self, *, coco: CocoDataset | None = None, **kwargs):
    self._coco = coco
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    metadata = tfds.core.MetadataDict(_metadata(self._coco)) if self._coco is not None else None
    return tfds.core.DatasetInfo(
      builder=self,
      description='COCO-format instance segmentation (dimaskdino_jax.data.tfds_builder)',
      features=features(),
      metadata=metadata,
      disable_shuffling=True,  # record i = i-th image by id, so the metadata index describes it
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {self.builder_config.name: self._generate_examples()}

  def _generate_examples(self):
    for i, record in enumerate(self._coco.images):
      yield i, _example(record)


def _builder_class(name: str) -> type:
  return type(f'CocoInstances_{name}', (_CocoInstancesBuilder,), {'name': name}, skip_registration=True)


def _check_names(name: str, split: str) -> None:
  if not _NAME_RE.match(name):
    raise DatasetError(f'dataset name {name!r}: use letters, digits, "_", "-" or "." (it becomes a directory)')
  if not _SPLIT_RE.match(split):
    raise DatasetError(f'split name {split!r}: use letters, digits or "_"')


def dataset_dir(data_dir: str, name: str, split: str) -> str:
  """Where a prepared split lives: data_dir/NAME/SPLIT/VERSION."""
  return os.path.join(data_dir, name, split, VERSION)


def is_prepared(data_dir: str, name: str, split: str) -> bool:
  path = dataset_dir(data_dir, name, split)
  return os.path.isfile(os.path.join(path, 'dataset_info.json')) and os.path.isfile(os.path.join(path, GT_FILE))


def build_dataset(coco: CocoDataset, name: str, split: str, data_dir: str, *, overwrite: bool = False) -> str:
  """Writes `coco` as split `split` of dataset `name` under `data_dir`; returns the dataset directory.

  An existing prepared split is kept unless overwrite=True.
  """
  _check_names(name, split)
  path = dataset_dir(data_dir, name, split)
  if is_prepared(data_dir, name, split) and not overwrite:
    return path
  if os.path.exists(path):
    shutil.rmtree(path)
  tfds.disable_progress_bar()
  builder = _builder_class(name)(
    data_dir=data_dir, config=tfds.core.BuilderConfig(name=split), file_format='array_record', coco=coco
  )
  with tempfile.TemporaryDirectory() as download_dir:
    builder.download_and_prepare(download_dir=download_dir)
  gt_path = os.path.join(builder.data_dir, GT_FILE)
  with open(gt_path + '.tmp', 'w') as f:
    json.dump(coco.to_coco_json(), f)
  os.replace(gt_path + '.tmp', gt_path)  # written last: its presence marks the split as prepared
  return builder.data_dir


class PreparedDataset:
  """The read side of a prepared split: data source, metadata, label map and COCO ground truth.

  data_source: random access to the records (`len`, `[i]` -> dict, see the module docstring).
  index: dict of numpy arrays per record (image_id, height, width, num_instances, num_noncrowd).
  label_map: contiguous label <-> COCO category id and names; `label_to_category_id` as an array.
  gt_json_path / coco(): the cleaned COCO ground truth of this split, for pycocotools evaluation.
  """

  def __init__(self, data_dir: str, name: str, split: str):
    self.data_dir, self.name, self.split = data_dir, name, split
    self.path = dataset_dir(data_dir, name, split)
    if not is_prepared(data_dir, name, split):
      raise DatasetError(
        f'{self.path}: split {split!r} of dataset {name!r} is not prepared under data_dir {data_dir!r}. Run '
        f'`python -m dimaskdino_jax.data.prepare --images IMAGE_DIR --annotations instances_{split}.json '
        f'--name {name} --split {split} --data-dir {data_dir}`, or set config.data.data_dir / config.data.name.'
      )
    self.builder = tfds.builder_from_directory(self.path)
    meta = self.builder.info.metadata
    self.metadata = dict(meta)
    self.label_map = LabelMap.from_json(meta['label_map'])
    self.index = {k: np.asarray(v, np.int64) for k, v in meta['index'].items()}
    self._source = None

  def __len__(self) -> int:
    return len(self.index['image_id'])

  @property
  def data_source(self):
    if self._source is None:
      self._source = self.builder.as_data_source(self.split)
    return self._source

  @property
  def num_classes(self) -> int:
    return self.label_map.num_classes

  @property
  def has_masks(self) -> bool:
    """False for a detection-only dataset (no segmentation in its annotation file): records have no masks."""
    return bool(self.metadata.get('has_masks', True))

  @property
  def category_names(self) -> tuple[str, ...]:
    return self.label_map.names

  @property
  def label_to_category_id(self) -> np.ndarray:
    """(C,) int64: contiguous label -> COCO category id."""
    return np.asarray(self.label_map.category_ids, np.int64)

  @property
  def gt_json_path(self) -> str:
    return os.path.join(self.path, GT_FILE)

  def coco(self):
    """A pycocotools COCO object of the ground truth (its loading chatter silenced)."""
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
      return COCO(self.gt_json_path)


def load_prepared(config, split: str | None = None) -> PreparedDataset:
  """The prepared split `split` (default config.data.val_split) of config.data.name under config.data.data_dir."""
  data_cfg = config.data
  return PreparedDataset(data_cfg.data_dir, data_cfg.name, split or data_cfg.val_split)
