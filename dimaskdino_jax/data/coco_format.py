"""Reading COCO-format instance annotations: validation, contiguous labels, per-image records, masks.

`load_coco_instances(annotation_file, image_dir)` reads a COCO `instances_*.json`, checks its structure (a file
that is not valid JSON or lacks a required key raises `DatasetError` naming the file and the key), maps the
category ids (sorted, possibly non-contiguous) to contiguous labels 0..C-1, and returns one `ImageRecord` per
usable image with its annotations converted to compressed RLE (pycocotools, `counts` as str).

Bad records are skipped and counted, never silently (DESIGN.md, Errors): an image whose file is missing or whose
size differs from the json, an annotation for an unknown image or category, a box with zero area, a
segmentation with no polygon of >= 3 points (bad polygons inside a valid list are dropped, as detectron2 does),
an RLE whose size differs from the image, a mask that decodes to nothing. `CocoDataset.skipped` says how many
and why; `summary()` is printed when loading with `verbose=True`.

Crowd annotations (`iscrowd=1`) are kept: evaluation needs them; the training transforms drop them.
"""

import collections
import dataclasses
import json
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util


class DatasetError(ValueError):
  """A dataset file that cannot be used; the message names the file, the key and the fix."""


# Reasons for skipping a record (the keys of `SkipCounter.counts`).
MISSING_IMAGE_FILE = 'missing image file'
IMAGE_SIZE_MISMATCH = 'image size differs from the json'
UNREADABLE_IMAGE = 'unreadable image file'
DUPLICATE_IMAGE_ID = 'duplicate image id'
UNKNOWN_IMAGE_ID = 'annotation for an unknown image id'
UNKNOWN_CATEGORY_ID = 'unknown category id'
ZERO_AREA_BOX = 'zero-area box'
BAD_POLYGON = 'polygon with < 3 points'
MISSING_SEGMENTATION = 'missing segmentation'
RLE_SIZE_MISMATCH = 'RLE size differs from the image'
EMPTY_MASK = 'empty mask'
DUPLICATE_ANNOTATION_ID = 'duplicate annotation id'


@dataclasses.dataclass(frozen=True)
class LabelMap:
  """Contiguous labels 0..C-1 <-> COCO category ids (sorted ascending), with names."""

  category_ids: tuple[int, ...]  # sorted ascending; label i <-> category_ids[i]
  names: tuple[str, ...]

  @classmethod
  def from_categories(cls, categories: Sequence[dict]) -> 'LabelMap':
    cats = sorted(categories, key=lambda c: int(c['id']))
    return cls(tuple(int(c['id']) for c in cats), tuple(str(c['name']) for c in cats))

  @property
  def num_classes(self) -> int:
    return len(self.category_ids)

  def to_label(self, category_id: int) -> int:
    """COCO category id -> contiguous label; KeyError for an unknown id."""
    return self._id_to_label()[int(category_id)]

  def to_category_id(self, label: int) -> int:
    """Contiguous label -> COCO category id."""
    return self.category_ids[int(label)]

  def labels_to_category_ids(self, labels) -> np.ndarray:
    """Vectorized label -> category id; `labels` is any integer array."""
    return np.asarray(self.category_ids, np.int64)[np.asarray(labels, np.int64)]

  def _id_to_label(self) -> dict[int, int]:
    return {c: i for i, c in enumerate(self.category_ids)}

  def to_json(self) -> dict:
    return {'category_ids': list(self.category_ids), 'names': list(self.names)}

  @classmethod
  def from_json(cls, d: dict) -> 'LabelMap':
    return cls(tuple(int(c) for c in d['category_ids']), tuple(str(n) for n in d['names']))


@dataclasses.dataclass
class AnnotationRecord:
  ann_id: int
  category_id: int  # COCO id
  label: int  # contiguous 0..C-1
  bbox: tuple[float, float, float, float]  # COCO xywh, absolute pixels, as given in the json
  area: float
  iscrowd: bool
  rle: dict  # compressed RLE: {'size': [h, w], 'counts': str}


@dataclasses.dataclass
class ImageRecord:
  image_id: int
  file_name: str
  path: str  # image_dir/file_name
  height: int
  width: int
  annotations: list[AnnotationRecord]

  @property
  def num_noncrowd(self) -> int:
    return sum(not a.iscrowd for a in self.annotations)


class SkipCounter:
  """Counts skipped records per reason and remembers a few examples of each."""

  def __init__(self, max_examples: int = 3):
    self.counts: dict[str, int] = collections.Counter()
    self.examples: dict[str, list[str]] = collections.defaultdict(list)
    self._max_examples = max_examples

  def add(self, reason: str, example: str) -> None:
    self.counts[reason] += 1
    if len(self.examples[reason]) < self._max_examples:
      self.examples[reason].append(example)

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def to_json(self) -> dict:
    return {'counts': dict(self.counts), 'examples': {k: list(v) for k, v in self.examples.items()}}


@dataclasses.dataclass
class CocoDataset:
  """A loaded and cleaned COCO instances file."""

  annotation_file: str
  image_dir: str
  images: list[ImageRecord]
  label_map: LabelMap
  categories: list[dict]  # the json's categories, sorted by id
  skipped_images: SkipCounter
  skipped_annotations: SkipCounter

  @property
  def num_annotations(self) -> int:
    return sum(len(r.annotations) for r in self.images)

  def summary(self) -> str:
    """One paragraph: what was kept and what was skipped, per reason with example ids."""
    num_crowd = sum(a.iscrowd for r in self.images for a in r.annotations)
    num_empty = sum(r.num_noncrowd == 0 for r in self.images)
    lines = [
      f'{self.annotation_file}: kept {len(self.images)} images ({num_empty} without non-crowd annotations), '
      f'{self.num_annotations} annotations ({num_crowd} crowd), {self.label_map.num_classes} categories.'
    ]
    for what, counter in (('images', self.skipped_images), ('annotations', self.skipped_annotations)):
      if counter.total:
        lines.append(f'  skipped {counter.total} {what}:')
        for reason, n in sorted(counter.counts.items()):
          lines.append(f'    {reason}: {n} (e.g. {"; ".join(counter.examples[reason])})')
    if not (self.skipped_images.total or self.skipped_annotations.total):
      lines.append('  skipped nothing.')
    return '\n'.join(lines)

  def to_coco_json(self) -> dict:
    """The cleaned ground truth as a COCO json dict (what the prepared dataset evaluates against).

    Only kept images and annotations; segmentations are the stored compressed RLEs (the exact masks the model
    trains on), `area` and `bbox` as in the source file.
    """
    images, annotations = [], []
    for r in self.images:
      images.append({'id': r.image_id, 'file_name': r.file_name, 'height': r.height, 'width': r.width})
      for a in r.annotations:
        annotations.append(
          {
            'id': a.ann_id,
            'image_id': r.image_id,
            'category_id': a.category_id,
            'bbox': [float(v) for v in a.bbox],
            'area': float(a.area),
            'iscrowd': int(a.iscrowd),
            'segmentation': {'size': list(a.rle['size']), 'counts': a.rle['counts']},
          }
        )
    return {'images': images, 'annotations': annotations, 'categories': self.categories}


def read_json(path: str) -> dict:
  """Reads a json file; invalid JSON raises DatasetError naming the file, line and column."""
  if not os.path.isfile(path):
    raise DatasetError(f'{path}: annotation file not found')
  with open(path, encoding='utf-8') as f:
    text = f.read()
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise DatasetError(
      f'{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}. Fix or regenerate the annotation file.'
    ) from None
  if not isinstance(data, dict):
    raise DatasetError(f'{path}: the top level must be a JSON object with keys images, annotations, categories')
  return data


def _require_keys(path: str, where: str, record, keys: Sequence[str]) -> None:
  if not isinstance(record, dict):
    raise DatasetError(f'{path}: {where} must be a JSON object, got {type(record).__name__}')
  for key in keys:
    if key not in record:
      raise DatasetError(
        f'{path}: missing key {key!r} in {where}; a COCO instances file needs it (see cocodataset.org/#format-data)'
      )


def _list_field(path: str, data: dict, key: str) -> list:
  _require_keys(path, 'the top-level object', data, [key])
  value = data[key]
  if not isinstance(value, list):
    raise DatasetError(f'{path}: key {key!r} must be a list, got {type(value).__name__}')
  return value


def segmentation_to_rle(segmentation, height: int, width: int) -> dict:
  """A COCO segmentation (polygon list, uncompressed or compressed RLE) -> compressed RLE with str counts.

  Raises ValueError for an unusable segmentation (no polygon with >= 3 points, wrong RLE size).
  """
  if isinstance(segmentation, list):
    polys = [[float(v) for v in p] for p in segmentation if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
    if not polys:
      raise ValueError(BAD_POLYGON)
    rle = mask_util.merge(mask_util.frPyObjects(polys, height, width))
  elif isinstance(segmentation, dict) and 'counts' in segmentation and 'size' in segmentation:
    size = [int(s) for s in segmentation['size']]
    if size != [height, width]:
      raise ValueError(RLE_SIZE_MISMATCH)
    counts = segmentation['counts']
    if isinstance(counts, list):  # uncompressed RLE (COCO crowd regions)
      rle = mask_util.frPyObjects(segmentation, height, width)
    else:
      rle = {'size': size, 'counts': counts.encode('ascii') if isinstance(counts, str) else counts}
  else:
    raise ValueError(MISSING_SEGMENTATION)
  counts = rle['counts']
  return {'size': [int(height), int(width)], 'counts': counts.decode('ascii') if isinstance(counts, bytes) else counts}


def encode_mask(mask: np.ndarray) -> dict:
  """(H, W) binary mask -> compressed RLE with str counts."""
  rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
  return {'size': [int(s) for s in rle['size']], 'counts': rle['counts'].decode('ascii')}


def decode_rles(counts: Sequence, height: int, width: int) -> np.ndarray:
  """Compressed RLE counts (str or bytes) of one image -> (N, H, W) uint8 masks."""
  if len(counts) == 0:
    return np.zeros((0, height, width), np.uint8)
  rles = [{'size': [height, width], 'counts': c if isinstance(c, bytes) else c.encode('ascii')} for c in counts]
  masks = mask_util.decode(rles)  # (H, W, N), Fortran order
  return np.ascontiguousarray(np.transpose(masks, (2, 0, 1)))


def _image_size(path: str) -> tuple[int, int] | None:
  """(height, width) from the file header, or None if it cannot be read."""
  try:
    with Image.open(path) as im:
      return im.height, im.width
  except (OSError, SyntaxError, ValueError):
    return None


def load_coco_instances(
  annotation_file: str, image_dir: str, *, check_files: bool = True, verbose: bool = True
) -> CocoDataset:
  """Loads and cleans a COCO instances json whose images live in `image_dir` (see the module docstring).

  check_files: skip images whose file is missing, unreadable or whose size differs from the json.
  Images are returned sorted by image id.
  """
  path = annotation_file
  data = read_json(path)
  raw_images = _list_field(path, data, 'images')
  raw_anns = _list_field(path, data, 'annotations')
  raw_cats = _list_field(path, data, 'categories')
  if not raw_cats:
    raise DatasetError(f'{path}: key "categories" is empty; list the categories as {{"id": ..., "name": ...}}')
  seen_cat_ids = set()
  for i, c in enumerate(raw_cats):
    _require_keys(path, f'categories[{i}]', c, ['id', 'name'])
    if int(c['id']) in seen_cat_ids:
      raise DatasetError(f'{path}: categories[{i}]: duplicate category id {c["id"]}')
    seen_cat_ids.add(int(c['id']))
  categories = sorted(
    [{'id': int(c['id']), 'name': str(c['name']), 'supercategory': str(c.get('supercategory', ''))} for c in raw_cats],
    key=lambda c: c['id'],
  )
  label_map = LabelMap.from_categories(categories)
  id_to_label = label_map._id_to_label()

  skipped_images, skipped_anns = SkipCounter(), SkipCounter()
  records: dict[int, ImageRecord] = {}
  for i, im in enumerate(raw_images):
    _require_keys(path, f'images[{i}]', im, ['id', 'file_name', 'height', 'width'])
    image_id = int(im['id'])
    example = f'image id {image_id} ({im["file_name"]})'
    if image_id in records:
      skipped_images.add(DUPLICATE_IMAGE_ID, example)
      continue
    file_path = os.path.join(image_dir, im['file_name'])
    height, width = int(im['height']), int(im['width'])
    if check_files:
      if not os.path.isfile(file_path):
        skipped_images.add(MISSING_IMAGE_FILE, f'{file_path}')
        continue
      size = _image_size(file_path)
      if size is None:
        skipped_images.add(UNREADABLE_IMAGE, f'{file_path}')
        continue
      if size != (height, width):
        skipped_images.add(IMAGE_SIZE_MISMATCH, f'{file_path} is {size[0]}x{size[1]}, json says {height}x{width}')
        continue
    records[image_id] = ImageRecord(image_id, str(im['file_name']), file_path, height, width, [])

  all_image_ids = {int(im['id']) for im in raw_images}
  seen_ann_ids = set()
  for i, a in enumerate(raw_anns):
    _require_keys(path, f'annotations[{i}]', a, ['id', 'image_id', 'category_id', 'bbox'])
    ann_id, image_id, cat_id = int(a['id']), int(a['image_id']), int(a['category_id'])
    example = f'annotation id {ann_id}'
    if ann_id in seen_ann_ids:
      skipped_anns.add(DUPLICATE_ANNOTATION_ID, example)
      continue
    seen_ann_ids.add(ann_id)
    record = records.get(image_id)
    if record is None:
      if image_id not in all_image_ids:  # annotations of skipped images are not counted twice
        skipped_anns.add(UNKNOWN_IMAGE_ID, f'{example} (image id {image_id})')
      continue
    if cat_id not in id_to_label:
      skipped_anns.add(UNKNOWN_CATEGORY_ID, f'{example} (category id {cat_id})')
      continue
    bbox = a['bbox']
    if not (isinstance(bbox, list) and len(bbox) == 4) or not (float(bbox[2]) > 0 and float(bbox[3]) > 0):
      skipped_anns.add(ZERO_AREA_BOX, f'{example} (bbox {bbox})')
      continue
    if 'segmentation' not in a:
      skipped_anns.add(MISSING_SEGMENTATION, example)
      continue
    try:
      rle = segmentation_to_rle(a['segmentation'], record.height, record.width)
    except ValueError as e:
      skipped_anns.add(str(e), example)
      continue
    area = float(mask_util.area({'size': rle['size'], 'counts': rle['counts'].encode('ascii')}))
    if area <= 0:
      skipped_anns.add(EMPTY_MASK, example)
      continue
    record.annotations.append(
      AnnotationRecord(
        ann_id=ann_id,
        category_id=cat_id,
        label=id_to_label[cat_id],
        bbox=tuple(float(v) for v in bbox),
        area=float(a.get('area', area)),
        iscrowd=bool(a.get('iscrowd', 0)),
        rle=rle,
      )
    )

  dataset = CocoDataset(
    annotation_file=path,
    image_dir=image_dir,
    images=[records[k] for k in sorted(records)],
    label_map=label_map,
    categories=categories,
    skipped_images=skipped_images,
    skipped_annotations=skipped_anns,
  )
  if verbose:
    print(dataset.summary(), flush=True)
  return dataset
