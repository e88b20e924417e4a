"""Reading COCO-format instance annotations: validation, contiguous labels, per-image records, masks.

`load_coco_instances(annotation_file, image_dir)` reads a COCO `instances_*.json`, checks its structure (a file
that is not valid JSON or lacks a required key raises `DatasetError` naming the file and the key), maps the
category ids (sorted, possibly non-contiguous) to contiguous labels 0..C-1 (any number of categories: the file
defines them), and returns one `ImageRecord` per usable image with its annotations converted to compressed RLE
(pycocotools, `counts` as str).

Bad records are skipped and counted, never silently, each under a reason below: image entries
that are malformed, duplicated, whose file is missing, unreadable or corrupt (every image is decoded once, JPEGs at
1/8 scale, which still reads every byte), larger than PIL's decompression-bomb limit or whose size differs from the
json; annotations that are malformed, duplicated, for an unknown image or category, with a malformed, zero-area or
entirely out-of-image box, with a missing, empty or malformed segmentation, no polygon of >= 3 points, an RLE
whose size differs from the image or whose counts do not add up to it, or a mask that decodes to nothing.

Repairs are counted too (`CocoDataset.repaired_*`): polygon parts with < 3 points inside a valid list are dropped
(as detectron2 does), boxes that extend more than half a pixel outside the image are clipped to it, grayscale /
RGBA / CMYK / palette / 16-bit images are converted to 8-bit RGB by the loader (`transforms.decode_image`), and an
EXIF orientation is baked into the stored pixels (`ImageRecord.exif_transpose`) when the json's size is that of the
rotated image or the orientation keeps the size (flips, 180 degrees), as detectron2's `read_image` applies it; when
the json describes the stored pixels of a 90-degree orientation, the tag is ignored (counted).

Detection-only datasets: when no annotation of the file has a segmentation, the dataset is box-only
(`CocoDataset.has_masks` False, `AnnotationRecord.rle` None); otherwise an annotation without a usable segmentation
is skipped (counted). `CocoDataset.summary()` lists what was kept, skipped and repaired, per reason with examples;
it is printed when loading with `verbose=True`.

Crowd annotations (`iscrowd=1`) are kept: evaluation needs them; the training transforms drop them.
"""

import collections
import concurrent.futures
import dataclasses
import json
import math
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util


class DatasetError(ValueError):
  """A dataset file that cannot be used; the message names the file, the key and the fix."""


# Reasons for skipping an image entry (the keys of `CocoDataset.skipped_images.counts`).
MALFORMED_IMAGE_ENTRY = 'malformed image entry'
DUPLICATE_IMAGE_ID = 'duplicate image id'
MISSING_IMAGE_FILE = 'missing image file'
UNREADABLE_IMAGE = 'unreadable or corrupt image file'
IMAGE_TOO_LARGE = "image larger than PIL's decompression-bomb limit"
IMAGE_SIZE_MISMATCH = 'image size differs from the json'
# Reasons for skipping an annotation.
MALFORMED_ANNOTATION = 'malformed annotation'
DUPLICATE_ANNOTATION_ID = 'duplicate annotation id'
UNKNOWN_IMAGE_ID = 'annotation for an unknown image id'
UNKNOWN_CATEGORY_ID = 'unknown category id'
MALFORMED_BOX = 'malformed box'
ZERO_AREA_BOX = 'zero-area box'
BOX_OUTSIDE_IMAGE = 'box outside the image'
MISSING_SEGMENTATION = 'missing segmentation'
EMPTY_SEGMENTATION = 'empty segmentation'
MALFORMED_SEGMENTATION = 'malformed segmentation'
BAD_POLYGON = 'polygon with < 3 points'
RLE_SIZE_MISMATCH = 'RLE size differs from the image'
MALFORMED_RLE = 'RLE counts do not add up to the image'
EMPTY_MASK = 'empty mask'
# Repairs (the record is kept; the keys of `CocoDataset.repaired_images / repaired_annotations.counts`).
GRAYSCALE_IMAGE = 'grayscale image (converted to RGB)'
ALPHA_IMAGE = 'image with alpha (alpha dropped)'
CMYK_IMAGE = 'CMYK image (converted to RGB)'
PALETTE_IMAGE = 'palette image (converted to RGB)'
HIGH_BIT_DEPTH_IMAGE = '16/32-bit image (scaled to 8 bits)'
OTHER_MODE_IMAGE = 'other colour mode (converted to RGB)'
EXIF_APPLIED = 'EXIF orientation applied'
EXIF_IGNORED = 'EXIF orientation ignored (the json describes the stored pixels)'
POLYGON_PART_DROPPED = 'polygon part with < 3 points dropped'
BOX_CLIPPED = 'box clipped to the image'

_MODE_REPAIRS = {
  'L': GRAYSCALE_IMAGE,
  '1': GRAYSCALE_IMAGE,
  'LA': ALPHA_IMAGE,
  'La': ALPHA_IMAGE,
  'RGBA': ALPHA_IMAGE,
  'RGBa': ALPHA_IMAGE,
  'PA': ALPHA_IMAGE,
  'CMYK': CMYK_IMAGE,
  'P': PALETTE_IMAGE,
  'I': HIGH_BIT_DEPTH_IMAGE,
  'F': HIGH_BIT_DEPTH_IMAGE,
}
_EXIF_ORIENTATION_TAG = 0x0112
_BOX_TOLERANCE = 0.5  # px a box may extend beyond the image before it is clipped (and counted)


def image_mode_repair(mode: str) -> str | None:
  """The repair the loader applies to an image of PIL mode `mode`, or None for 8-bit RGB."""
  if mode == 'RGB':
    return None
  if mode.startswith('I;16'):
    return HIGH_BIT_DEPTH_IMAGE
  return _MODE_REPAIRS.get(mode, OTHER_MODE_IMAGE)


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
    return {category_id: label for label, category_id in enumerate(self.category_ids)}

  def to_json(self) -> dict:
    return {'category_ids': list(self.category_ids), 'names': list(self.names)}

  @classmethod
  def from_json(cls, data: dict) -> 'LabelMap':
    return cls(tuple(int(c) for c in data['category_ids']), tuple(str(n) for n in data['names']))


@dataclasses.dataclass
class AnnotationRecord:
  ann_id: int
  category_id: int  # COCO id
  label: int  # contiguous 0..C-1
  bbox: tuple[float, float, float, float]  # COCO xywh, absolute pixels, as given in the json
  area: float
  iscrowd: bool
  rle: dict | None  # compressed RLE: {'size': [h, w], 'counts': str}; None in a detection-only dataset


@dataclasses.dataclass
class ImageRecord:
  image_id: int
  file_name: str
  path: str  # image_dir/file_name
  height: int
  width: int
  annotations: list[AnnotationRecord]
  exif_transpose: bool = False  # store the pixels with the file's EXIF orientation applied

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
  repaired_images: SkipCounter = dataclasses.field(default_factory=SkipCounter)
  repaired_annotations: SkipCounter = dataclasses.field(default_factory=SkipCounter)
  has_masks: bool = True  # False: detection-only (no annotation of the file has a segmentation)

  @property
  def num_annotations(self) -> int:
    return sum(len(r.annotations) for r in self.images)

  def summary(self) -> str:
    """One paragraph: what was kept, skipped and repaired, per reason with example ids."""
    num_crowd = sum(a.iscrowd for r in self.images for a in r.annotations)
    num_empty = sum(r.num_noncrowd == 0 for r in self.images)
    kind = 'boxes and masks' if self.has_masks else 'boxes only (detection-only: no segmentation in the file)'
    lines = [
      f'{self.annotation_file}: kept {len(self.images)} images ({num_empty} without non-crowd annotations), '
      f'{self.num_annotations} annotations ({num_crowd} crowd; {kind}), {self.label_map.num_classes} categories.'
    ]
    skipped = (('skipped', 'images', self.skipped_images), ('skipped', 'annotations', self.skipped_annotations))
    repaired = (('repaired', 'images', self.repaired_images), ('repaired', 'annotations', self.repaired_annotations))
    for verb, what, counter in (*skipped, *repaired):
      if counter.total:
        lines.append(f'  {verb} {counter.total} {what}:')
        for reason, n in sorted(counter.counts.items()):
          lines.append(f'    {reason}: {n} (e.g. {"; ".join(counter.examples[reason])})')
    if not (self.skipped_images.total or self.skipped_annotations.total):
      lines.append('  skipped nothing.')
    return '\n'.join(lines)

  def to_coco_json(self) -> dict:
    """The cleaned ground truth as a COCO json dict (what the prepared dataset evaluates against).

    Only kept images and annotations; segmentations are the stored compressed RLEs (the exact masks the model
    trains on; no `segmentation` key in a detection-only dataset), `area` as in the source file, `bbox` as in the
    source file or clipped to the image (a counted repair).
    """
    images, annotations = [], []
    for image_record in self.images:
      images.append(
        {
          'id': image_record.image_id,
          'file_name': image_record.file_name,
          'height': image_record.height,
          'width': image_record.width,
        }
      )
      for record in image_record.annotations:
        ann = {
          'id': record.ann_id,
          'image_id': image_record.image_id,
          'category_id': record.category_id,
          'bbox': [float(v) for v in record.bbox],
          'area': float(record.area),
          'iscrowd': int(record.iscrowd),
        }
        if record.rle is not None:
          ann['segmentation'] = {'size': list(record.rle['size']), 'counts': record.rle['counts']}
        annotations.append(ann)
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


class _Skip(Exception):
  """A record cannot be used: `reason` is one of the module's reason strings."""

  def __init__(self, reason: str, detail: str = ''):
    super().__init__(reason)
    self.reason, self.detail = reason, detail


def rle_counts_from_string(counts: str) -> list[int]:
  """Decodes the run lengths of a compressed COCO RLE string (pycocotools' rleFrString), validating it.

  Raises ValueError for a character outside the alphabet, a truncated value or a negative run length.
  """
  out: list[int] = []
  pos, length = 0, len(counts)
  while pos < length:
    value, shift, more = 0, 0, True
    while more:
      if pos >= length:
        raise ValueError('truncated RLE counts')
      char = ord(counts[pos]) - 48
      if not 0 <= char < 64:
        raise ValueError(f'character {counts[pos]!r} is not RLE data')
      value |= (char & 0x1F) << (5 * shift)
      more = bool(char & 0x20)
      pos += 1
      shift += 1
      if not more and char & 0x10:
        value |= -1 << (5 * shift)
    if len(out) > 2:
      value += out[-2]
    if value < 0:
      raise ValueError('negative run length')
    out.append(value)
  return out


def _check_run_lengths(counts: Sequence[int], height: int, width: int) -> None:
  if sum(counts) != height * width:
    raise _Skip(MALFORMED_RLE, f'runs add up to {sum(counts)}, the image has {height * width} pixels')


def segmentation_to_rle(segmentation, height: int, width: int, repairs: list | None = None) -> dict:
  """A COCO segmentation (polygon list, uncompressed or compressed RLE) -> compressed RLE with str counts.

  Raises _Skip for an unusable segmentation (see the reasons above). Polygon parts with < 3 points (or an odd or
  non-numeric coordinate list) are dropped when another part is valid; each drop appends POLYGON_PART_DROPPED to
  `repairs`. Every RLE is validated before pycocotools reads it (its C decoder does not bounds-check).
  """
  if segmentation is None:
    raise _Skip(MISSING_SEGMENTATION)
  if isinstance(segmentation, list):
    if not segmentation:
      raise _Skip(EMPTY_SEGMENTATION)
    polys, malformed = [], False
    for part in segmentation:
      if not isinstance(part, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in part):
        malformed = True
      elif len(part) >= 6 and len(part) % 2 == 0 and all(math.isfinite(v) for v in part):
        polys.append([float(v) for v in part])
        continue
      if repairs is not None:
        repairs.append(POLYGON_PART_DROPPED)
    if not polys:
      if malformed:
        raise _Skip(MALFORMED_SEGMENTATION, 'polygon coordinates are not lists of numbers')
      raise _Skip(BAD_POLYGON)
    rle = mask_util.merge(mask_util.frPyObjects(polys, height, width))
  elif isinstance(segmentation, dict):
    if 'counts' not in segmentation or 'size' not in segmentation:
      raise _Skip(MALFORMED_SEGMENTATION, 'an RLE needs "size" and "counts"')
    try:
      size = [int(s) for s in segmentation['size']]
    except (TypeError, ValueError):
      raise _Skip(MALFORMED_SEGMENTATION, f'RLE size {segmentation["size"]!r}') from None
    if size != [height, width]:
      raise _Skip(RLE_SIZE_MISMATCH, f'RLE size {size}, image {height}x{width}')
    counts = segmentation['counts']
    if isinstance(counts, list):  # uncompressed RLE (COCO crowd regions)
      if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts):
        raise _Skip(MALFORMED_RLE, 'uncompressed counts must be non-negative integers')
      _check_run_lengths(counts, height, width)
      rle = mask_util.frPyObjects({'size': size, 'counts': counts}, height, width)
    elif isinstance(counts, (str, bytes)):
      text = counts.decode('ascii', 'replace') if isinstance(counts, bytes) else counts
      try:
        runs = rle_counts_from_string(text)
      except ValueError as e:
        raise _Skip(MALFORMED_RLE, str(e)) from None
      _check_run_lengths(runs, height, width)
      rle = {'size': size, 'counts': text.encode('ascii')}
    else:
      raise _Skip(MALFORMED_SEGMENTATION, f'RLE counts of type {type(counts).__name__}')
  else:
    raise _Skip(MALFORMED_SEGMENTATION, f'a segmentation of type {type(segmentation).__name__}')
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


def exif_orientation(image: Image.Image) -> int:
  """The EXIF orientation tag of an open image (1 = none; 2..8 = flips and rotations)."""
  try:
    value = int(image.getexif().get(_EXIF_ORIENTATION_TAG, 1))
  except (OSError, SyntaxError, ValueError, TypeError):
    return 1
  return value if 1 <= value <= 8 else 1


@dataclasses.dataclass
class ImageCheck:
  """What opening an image file found: `skip` (a reason) or the repairs the loader / prepare will apply."""

  skip: str | None = None
  detail: str = ''
  repairs: tuple[str, ...] = ()
  exif_transpose: bool = False


def check_image_file(path: str, height: int, width: int) -> ImageCheck:
  """Opens and decodes `path` (JPEGs at 1/8 scale) and compares its size with the json's (height, width)."""
  if not os.path.isfile(path):
    return ImageCheck(MISSING_IMAGE_FILE, path)
  try:
    with Image.open(path) as image:
      raw_hw, mode, orientation = (image.height, image.width), image.mode, exif_orientation(image)
      image.draft(None, (max(1, image.width // 8), max(1, image.height // 8)))
      image.load()
  except Image.DecompressionBombError as e:
    return ImageCheck(IMAGE_TOO_LARGE, f'{path}: {e}')
  except (OSError, SyntaxError, ValueError, EOFError) as e:
    return ImageCheck(UNREADABLE_IMAGE, f'{path}: {e}')
  repairs = [r for r in (image_mode_repair(mode),) if r]
  json_hw = (height, width)
  transpose = False
  if orientation != 1:
    oriented_hw = raw_hw[::-1] if orientation >= 5 else raw_hw
    if oriented_hw == json_hw:
      transpose = True
      repairs.append(EXIF_APPLIED)
    elif raw_hw == json_hw:
      repairs.append(EXIF_IGNORED)
    else:
      return ImageCheck(IMAGE_SIZE_MISMATCH, f'{path} is {raw_hw[0]}x{raw_hw[1]}, json says {height}x{width}')
  elif raw_hw != json_hw:
    return ImageCheck(IMAGE_SIZE_MISMATCH, f'{path} is {raw_hw[0]}x{raw_hw[1]}, json says {height}x{width}')
  return ImageCheck(None, '', tuple(repairs), transpose)


def _number(value) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ValueError(value)
  return float(value)


def _clean_box(bbox, height: int, width: int, repairs: list) -> tuple[float, float, float, float]:
  """COCO xywh -> the same box, or clipped to the image when it extends more than _BOX_TOLERANCE px beyond it."""
  try:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
      raise ValueError(bbox)
    x, y, w, h = (_number(v) for v in bbox)
  except ValueError:
    raise _Skip(MALFORMED_BOX, f'bbox {bbox!r}') from None
  if not (w > 0 and h > 0):
    raise _Skip(ZERO_AREA_BOX, f'bbox {bbox}')
  x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
  if not (x1 > x0 and y1 > y0):
    raise _Skip(BOX_OUTSIDE_IMAGE, f'bbox {bbox}, image {height}x{width}')
  if max(abs(x0 - x), abs(y0 - y), abs(x1 - x - w), abs(y1 - y - h)) > _BOX_TOLERANCE:
    repairs.append(BOX_CLIPPED)
    return (x0, y0, x1 - x0, y1 - y0)
  return (x, y, w, h)


def _has_segmentation(ann) -> bool:
  return isinstance(ann, dict) and ann.get('segmentation') not in (None, [], {}, '')


def _image_entry(index: int, entry) -> tuple[int, str, int, int]:
  """(id, file_name, height, width) of images[index]; _Skip(MALFORMED_IMAGE_ENTRY) for values of the wrong type."""
  try:
    image_id = int(entry['id'])
    height, width = int(entry['height']), int(entry['width'])
    if isinstance(entry['id'], bool) or height <= 0 or width <= 0 or not isinstance(entry['file_name'], str):
      raise ValueError
  except (TypeError, ValueError):
    size = f'{entry["height"]!r}x{entry["width"]!r}'
    detail = f'images[{index}]: id {entry["id"]!r}, file_name {entry["file_name"]!r}, size {size}'
    raise _Skip(MALFORMED_IMAGE_ENTRY, detail) from None
  return image_id, entry['file_name'], height, width


def _int_or_none(value) -> int | None:
  try:
    return int(value)
  except (TypeError, ValueError):
    return None


def load_coco_instances(
  annotation_file: str,
  image_dir: str,
  *,
  check_files: bool = True,
  verbose: bool = True,
  num_threads: int | None = None,
) -> CocoDataset:
  """Loads and cleans a COCO instances json whose images live in `image_dir` (see the module docstring).

  check_files: open and decode every image (skipping unreadable, corrupt, too large or wrongly sized ones, and
  noting colour-mode and EXIF repairs); num_threads of them at a time (default: up to 8). Without it only missing
  files are skipped (the loader then flags undecodable records in record_error).
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
    try:
      cat_id = int(c['id'])
    except (TypeError, ValueError):
      raise DatasetError(f'{path}: categories[{i}]: key "id" must be an integer, got {c["id"]!r}') from None
    if cat_id in seen_cat_ids:
      raise DatasetError(f'{path}: categories[{i}]: duplicate category id {c["id"]}')
    seen_cat_ids.add(cat_id)
  categories = sorted(
    [{'id': int(c['id']), 'name': str(c['name']), 'supercategory': str(c.get('supercategory', ''))} for c in raw_cats],
    key=lambda c: c['id'],
  )
  label_map = LabelMap.from_categories(categories)
  id_to_label = label_map._id_to_label()
  has_masks = any(_has_segmentation(a) for a in raw_anns)

  skipped_images, skipped_anns = SkipCounter(), SkipCounter()
  repaired_images, repaired_anns = SkipCounter(), SkipCounter()
  entries = []  # (image_id, file_name, height, width, path) of well-formed, first-seen image entries
  seen_image_ids = set()
  for i, entry in enumerate(raw_images):
    _require_keys(path, f'images[{i}]', entry, ['id', 'file_name', 'height', 'width'])
    try:
      image_id, file_name, height, width = _image_entry(i, entry)
    except _Skip as e:
      skipped_images.add(e.reason, e.detail)
      continue
    if image_id in seen_image_ids:
      skipped_images.add(DUPLICATE_IMAGE_ID, f'image id {image_id} ({file_name})')
      continue
    seen_image_ids.add(image_id)
    entries.append((image_id, file_name, height, width, os.path.join(image_dir, file_name)))

  checks = [ImageCheck() if os.path.isfile(e[4]) else ImageCheck(MISSING_IMAGE_FILE, e[4]) for e in entries]
  if check_files and entries:
    threads = num_threads or min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:  # PIL decodes without the GIL
      checks = list(pool.map(lambda e: check_image_file(e[4], e[2], e[3]), entries))
  records: dict[int, ImageRecord] = {}
  for (image_id, file_name, height, width, file_path), check in zip(entries, checks):
    if check.skip:
      skipped_images.add(check.skip, check.detail or f'image id {image_id} ({file_name})')
      continue
    for repair in check.repairs:
      repaired_images.add(repair, f'image id {image_id} ({file_name})')
    records[image_id] = ImageRecord(image_id, file_name, file_path, height, width, [], check.exif_transpose)

  all_image_ids = {_int_or_none(im['id']) for im in raw_images}
  seen_ann_ids = set()
  for i, a in enumerate(raw_anns):
    _require_keys(path, f'annotations[{i}]', a, ['id', 'image_id', 'category_id', 'bbox'])
    try:
      ann_id, image_id, cat_id = int(a['id']), int(a['image_id']), int(a['category_id'])
    except (TypeError, ValueError):
      skipped_anns.add(MALFORMED_ANNOTATION, f'annotations[{i}]: id {a["id"]!r}, image_id {a["image_id"]!r}')
      continue
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
    repairs: list[str] = []
    try:
      bbox = _clean_box(a['bbox'], record.height, record.width, repairs)
      rle = None
      if has_masks:
        rle = segmentation_to_rle(a.get('segmentation'), record.height, record.width, repairs)
        mask_area = float(mask_util.area({'size': rle['size'], 'counts': rle['counts'].encode('ascii')}))
        if mask_area <= 0:
          raise _Skip(EMPTY_MASK)
    except _Skip as e:
      skipped_anns.add(e.reason, f'{example}{f" ({e.detail})" if e.detail else ""}')
      continue
    try:
      area = _number(a.get('area'))
    except ValueError:
      area = mask_area if has_masks else bbox[2] * bbox[3]
    for repair in repairs:
      repaired_anns.add(repair, example)
    record.annotations.append(
      AnnotationRecord(
        ann_id=ann_id,
        category_id=cat_id,
        label=id_to_label[cat_id],
        bbox=bbox,
        area=area,
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
    repaired_images=repaired_images,
    repaired_annotations=repaired_anns,
    has_masks=has_masks,
  )
  if verbose:
    print(dataset.summary(), flush=True)
  return dataset
