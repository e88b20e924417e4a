"""Per-image transforms on host numpy arrays (no grain, no model code): decode, LSJ, resize, targets, eval resize.

Training (`TrainTransform`; docs/architecture.md, "Training settings"):
  * crowd annotations are dropped before anything else;
  * 'lsj' = detectron2's COCOInstanceNewBaselineDatasetMapper, in this order and with the same random draws:
    RandomFlip(horizontal, p=0.5): flip when U[0,1) < 0.5;
    ResizeScale: s ~ U[min_scale, max_scale], scale = min(S*s/h, S*s/w), new size = np.round((h, w) * scale),
      image resized with PIL bilinear (detectron2's ResizeTransform for uint8 images);
    FixedSizeCrop(S): offset = np.round(max(new - S, 0) * u) with ONE u ~ U[0,1) for both axes, crop S x S,
      pad bottom/right to S x S with pad_value (128, before normalization);
  * 'resize' (the shapes config): flip as above, resize so the longest side is S (keeping aspect, np.round),
    pad bottom/right to S x S with pad_value;
  * masks follow the same geometry with nearest-neighbour sampling (source pixel floor((i + 0.5) * in / out)),
    computed only inside the crop; boxes are recomputed tight from the transformed masks
    (x0, y0, x1 + 1, y1 + 1 in canvas pixels, detectron2's BitMasks.get_bounding_boxes) and instances whose
    mask became empty are filtered. (detectron2 transforms polygons and re-rasterizes them; we store RLE masks,
    so small boundary differences remain when upscaling.)
  * targets are padded to G = max_instances slots, valid first; beyond G the G largest (by transformed mask
    area) are kept in their original order and the rest counted in `num_dropped`;
  * masks are stored at stride s of the canvas by AREA AVERAGE: a stride-s cell is 1 when >= half of its s x s
    canvas pixels are inside the mask. Cell (i, j) covers canvas pixels [i*s, (i+1)*s) x [j*s, (j+1)*s), which
    is what point sampling with normalized coordinates (x * W - 0.5, align_corners=False) assumes.

Evaluation (`EvalTransform`): detectron2's ResizeShortestEdge(short, max) size rule and PIL bilinear, image
placed top-left in its canvas, the rest filled with `pad_value` (default: the rounded pixel mean, i.e. ~0 after
normalization, as the official code pads with 0 after normalizing; mask the padding with image_hw for exact
parity).
"""

import dataclasses
import io
import logging
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from dimaskdino_jax.data.coco_format import decode_rles

log = logging.getLogger(__name__)


# What a bad stored image raises when decoded (PIL: truncated or corrupt data, unknown format, too many pixels).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def to_rgb(image: Image.Image) -> np.ndarray:
  """An open PIL image of any mode -> (H, W, 3) uint8 RGB.

  16-bit modes ('I;16*', and 'I', as 16-bit PNGs and TIFFs load) are scaled by 255 / 65535 (PIL's own convert
  would clip them at 255); 'F' is clipped to [0, 255]; grayscale, palette, CMYK and alpha modes go through PIL's
  convert('RGB') (alpha dropped).
  """
  if image.mode == 'RGB':
    return np.asarray(image)
  if image.mode.startswith('I;16') or image.mode in ('I', 'F'):
    pixels = np.asarray(image).astype(np.float32)
    if image.mode != 'F':
      pixels = pixels * (255.0 / 65535.0)
    gray = np.clip(np.round(pixels), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=2)
  return np.asarray(image.convert('RGB'))


def decode_image(data: bytes) -> np.ndarray:
  """Encoded image bytes -> (H, W, 3) uint8 RGB (`to_rgb`); raises one of DECODE_ERRORS for bad data.

  The EXIF orientation is NOT applied here: prepare stores the pixels with it already applied where it applies
  (tfds_builder), so the stored pixels are what the json's height/width and the annotations describe.
  """
  with Image.open(io.BytesIO(data)) as im:
    return to_rgb(im)


def resize_image(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """PIL bilinear resize of a (H, W, 3) uint8 image to hw = (h, w) (detectron2 ResizeTransform for uint8)."""
  if image.shape[:2] == tuple(hw):
    return image
  return np.asarray(Image.fromarray(image).resize((int(hw[1]), int(hw[0])), Image.BILINEAR))


def _nearest_index(out_len: int, in_len: int, start: int, count: int) -> np.ndarray:
  """Source index of output pixels start..start+count-1 when resizing in_len -> out_len (nearest)."""
  idx = np.floor((np.arange(start, start + count) + 0.5) * (in_len / out_len)).astype(np.int64)
  return np.clip(idx, 0, in_len - 1)


def lsj_geometry(hw, rng: np.random.Generator, image_size: int, min_scale: float, max_scale: float, random_flip: bool):
  """The random draws of RandomFlip -> ResizeScale -> FixedSizeCrop: (flip, resized (h, w), crop offset (y, x))."""
  flip = bool(random_flip and rng.random() < 0.5)
  scale = rng.uniform(min_scale, max_scale)
  input_size = np.asarray(hw, np.float64)
  target = np.asarray((image_size, image_size), np.float64) * scale
  output_scale = np.minimum(target[0] / input_size[0], target[1] / input_size[1])
  new_hw = np.maximum(np.round(input_size * output_scale).astype(int), 1)  # >= 1 px for extreme aspect ratios
  max_offset = np.maximum(new_hw - image_size, 0)
  offset = np.round(max_offset * rng.uniform(0.0, 1.0)).astype(int)
  return flip, (int(new_hw[0]), int(new_hw[1])), (int(offset[0]), int(offset[1]))


def resize_geometry(hw, rng: np.random.Generator, image_size: int, random_flip: bool):
  """Flip, then resize the longest side to image_size (keeping aspect): (flip, resized (h, w), offset (0, 0))."""
  flip = bool(random_flip and rng.random() < 0.5)
  scale = image_size / max(hw)
  new_hw = np.minimum(np.round(np.asarray(hw, np.float64) * scale).astype(int), image_size)
  new_hw = np.maximum(new_hw, 1)
  return flip, (int(new_hw[0]), int(new_hw[1])), (0, 0)


def apply_geometry(image, flip, new_hw, offset, canvas_hw, pad_value):
  """Flip, resize to new_hw, crop canvas_hw at offset, pad bottom/right: (H, W, 3) uint8 -> (Hc, Wc, 3) uint8."""
  if flip:
    image = image[:, ::-1]
  resized = resize_image(np.ascontiguousarray(image), new_hw)
  y0, x0 = offset
  ch, cw = min(canvas_hw[0], new_hw[0] - y0), min(canvas_hw[1], new_hw[1] - x0)
  canvas = np.full((canvas_hw[0], canvas_hw[1], 3), pad_value, np.uint8)
  canvas[:ch, :cw] = resized[y0 : y0 + ch, x0 : x0 + cw]
  return canvas


@dataclasses.dataclass
class CanvasMask:
  """One transformed instance mask: `mask` (h, w) bool placed at canvas pixels [y0, y0+h) x [x0, x0+w)."""

  mask: np.ndarray
  y0: int
  x0: int

  @property
  def area(self) -> int:
    return int(np.count_nonzero(self.mask))


def transform_masks(masks, flip, new_hw, offset, canvas_hw) -> list[CanvasMask]:
  """The geometry of `apply_geometry` applied to (N, H, W) masks by nearest-neighbour sampling.

  `masks` is an (N, H, W) array or any sequence of (H, W) arrays (e.g. decoded one at a time, see _LazyMasks).
  Only the part of the canvas that an instance's source box maps to is computed (cheap at 1024 x 1024).
  """
  if len(masks) == 0:
    return []
  h, w = np.shape(masks[0])
  y0, x0 = offset
  ch, cw = min(canvas_hw[0], new_hw[0] - y0), min(canvas_hw[1], new_hw[1] - x0)
  rows = _nearest_index(new_hw[0], h, y0, ch)  # source row of each canvas row, nondecreasing
  cols = _nearest_index(new_hw[1], w, x0, cw)  # source column (in the flipped image) of each canvas column
  out = []
  for i in range(len(masks)):
    mask = masks[i]
    if flip:
      mask = mask[:, ::-1]
    ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if len(ys) == 0:
      out.append(CanvasMask(np.zeros((0, 0), bool), 0, 0))
      continue
    a0, a1 = np.searchsorted(rows, [ys[0], ys[-1] + 1])
    b0, b1 = np.searchsorted(cols, [xs[0], xs[-1] + 1])
    canvas_part = mask[rows[a0:a1, None], cols[None, b0:b1]].astype(bool)
    out.append(CanvasMask(canvas_part, int(a0), int(b0)))
  return out


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
  """(N, H, W) bool -> (N, 4) float32 tight xyxy (x0, y0, x1 + 1, y1 + 1); zeros for empty masks."""
  n, h, w = masks.shape
  rows, cols = masks.any(axis=2), masks.any(axis=1)  # (N, H), (N, W)
  y0, y1 = rows.argmax(axis=1), h - rows[:, ::-1].argmax(axis=1)
  x0, x1 = cols.argmax(axis=1), w - cols[:, ::-1].argmax(axis=1)
  boxes = np.stack([x0, y0, x1, y1], axis=1).astype(np.float32)
  boxes[~rows.any(axis=1)] = 0.0
  return boxes


def _downsample_into(out: np.ndarray, canvas_mask: CanvasMask, stride: int) -> None:
  """Writes canvas_mask into out (Hc/s, Wc/s) uint8: a cell is 1 when >= half of its s x s pixels are in the mask."""
  mask, y0, x0 = canvas_mask.mask, canvas_mask.y0, canvas_mask.x0
  hh, ww = mask.shape
  if stride == 1:
    out[y0 : y0 + hh, x0 : x0 + ww] = mask
    return
  ay0, ax0 = y0 // stride * stride, x0 // stride * stride  # the cell-aligned region around the mask
  ay1, ax1 = -(-(y0 + hh) // stride) * stride, -(-(x0 + ww) // stride) * stride
  padded = np.zeros((ay1 - ay0, ax1 - ax0), np.uint8)
  padded[y0 - ay0 : y0 - ay0 + hh, x0 - ax0 : x0 - ax0 + ww] = mask
  counts = padded.reshape((ay1 - ay0) // stride, stride, (ax1 - ax0) // stride, stride).sum(axis=(1, 3))
  out[ay0 // stride : ay1 // stride, ax0 // stride : ax1 // stride] = 2 * counts >= stride * stride


def downsample_masks(masks: np.ndarray, canvas_hw, stride: int) -> np.ndarray:
  """(N, h, w) bool masks at the top-left of a canvas -> (N, Hc/s, Wc/s) uint8 by area average >= 0.5."""
  out = np.zeros((masks.shape[0], canvas_hw[0] // stride, canvas_hw[1] // stride), np.uint8)
  for i, mask in enumerate(masks):
    _downsample_into(out[i], CanvasMask(mask.astype(bool), 0, 0), stride)
  return out


def pack_targets(masks: list[CanvasMask], labels, canvas_hw, max_instances: int, stride: int) -> dict:
  """Transformed masks + labels (N,) -> fixed-size targets (see the module docstring)."""
  areas = np.array([canvas_mask.area for canvas_mask in masks], np.int64)
  keep = np.nonzero(areas > 0)[0]
  num_dropped = max(0, len(keep) - max_instances)
  if num_dropped:
    largest = keep[np.argsort(-areas[keep], kind='stable')[:max_instances]]
    keep = np.sort(largest)
  n = len(keep)
  hc, wc = canvas_hw
  boxes = np.zeros((max_instances, 4), np.float32)
  out_labels = np.zeros((max_instances,), np.int32)
  out_labels[:n] = np.asarray(labels)[keep]
  valid = np.zeros((max_instances,), bool)
  valid[:n] = True
  out_masks = np.zeros((max_instances, hc // stride, wc // stride), np.uint8)
  for slot, i in enumerate(keep):
    canvas_mask = masks[i]
    corner = np.array([canvas_mask.x0, canvas_mask.y0, canvas_mask.x0, canvas_mask.y0], np.float32)
    bx0, by0, bx1, by1 = masks_to_boxes(canvas_mask.mask[None])[0] + corner
    boxes[slot] = ((bx0 + bx1) / (2 * wc), (by0 + by1) / (2 * hc), (bx1 - bx0) / wc, (by1 - by0) / hc)
    _downsample_into(out_masks[slot], canvas_mask, stride)
  return {
    'boxes': boxes,
    'labels': out_labels,
    'valid': valid,
    'masks': out_masks,
    'num_dropped': np.int32(num_dropped),
  }


def transform_boxes(boxes, hw, flip, new_hw, offset, canvas_hw) -> np.ndarray:
  """The geometry of `apply_geometry` applied to (N, 4) xyxy boxes in original pixels -> canvas pixels, clipped to
  the visible (non-padding) part of the canvas; a box that leaves it gets zero area."""
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4).copy()
  h, w = hw
  if flip:
    boxes[:, [0, 2]] = w - boxes[:, [2, 0]]
  boxes *= np.asarray([new_hw[1] / w, new_hw[0] / h] * 2, np.float32)
  boxes -= np.asarray([offset[1], offset[0]] * 2, np.float32)
  ch, cw = min(canvas_hw[0], new_hw[0] - offset[0]), min(canvas_hw[1], new_hw[1] - offset[1])
  return np.clip(boxes, 0.0, np.asarray([cw, ch, cw, ch], np.float32))


def pack_box_targets(boxes, labels, canvas_hw, max_instances: int) -> dict:
  """Detection-only targets: canvas-pixel xyxy boxes (N, 4) + labels (N,) -> fixed-size targets without masks.

  Boxes with zero width or height are filtered; beyond G the G largest (by box area) are kept in their order.
  """
  boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
  wh = boxes[:, 2:] - boxes[:, :2]
  keep = np.nonzero((wh > 0).all(axis=1))[0]
  num_dropped = max(0, len(keep) - max_instances)
  if num_dropped:
    areas = wh[keep, 0] * wh[keep, 1]
    keep = np.sort(keep[np.argsort(-areas, kind='stable')[:max_instances]])
  n = len(keep)
  hc, wc = canvas_hw
  out_boxes = np.zeros((max_instances, 4), np.float32)
  kept = boxes[keep]
  out_boxes[:n] = np.stack(
    [
      (kept[:, 0] + kept[:, 2]) / (2 * wc),
      (kept[:, 1] + kept[:, 3]) / (2 * hc),
      (kept[:, 2] - kept[:, 0]) / wc,
      (kept[:, 3] - kept[:, 1]) / hc,
    ],
    axis=1,
  )
  out_labels = np.zeros((max_instances,), np.int32)
  out_labels[:n] = np.asarray(labels)[keep]
  valid = np.zeros((max_instances,), bool)
  valid[:n] = True
  return {'boxes': out_boxes, 'labels': out_labels, 'valid': valid, 'num_dropped': np.int32(num_dropped)}


class _LazyMasks:
  """Compressed RLE counts decoded one mask at a time: (H, W) uint8 per index (a very large image never holds
  all its masks at full resolution at once)."""

  def __init__(self, counts, height: int, width: int):
    self._counts, self._hw = list(counts), (int(height), int(width))

  def __len__(self) -> int:
    return len(self._counts)

  def __getitem__(self, i) -> np.ndarray:
    return decode_rles([self._counts[i]], *self._hw)[0]


class TrainTransform:
  """record (a prepared-dataset dict) + rng -> one training example with static shapes.

  Output: image uint8 (S, S, 3); boxes float32 (G, 4) cxcywh in [0, 1] of the S x S canvas; labels int32 (G,);
  valid bool (G,) packed first; masks uint8 (G, S/s, S/s) (absent when with_masks is False: detection-only data,
  boxes then follow the geometry and are clipped to the crop); num_dropped int32 () (instances beyond G);
  record_error bool (): the record could not be decoded (corrupt image bytes, size differing from the record):
  the example is a pad_value image with no targets, a warning names the image id, and the run goes on.
  """

  def __init__(
    self,
    kind: str = 'lsj',
    image_size: int = 1024,
    min_scale: float = 0.1,
    max_scale: float = 2.0,
    random_flip: bool = True,
    pad_value: int = 128,
    max_instances: int = 100,
    mask_stride: int = 4,
    with_masks: bool = True,
  ):
    if kind not in ('lsj', 'resize'):
      raise ValueError(f"data.train_transform: {kind!r} is not 'lsj' or 'resize'")
    if image_size % mask_stride:
      raise ValueError(f'data.mask_stride {mask_stride} does not divide data.image_size {image_size}')
    self.kind, self.image_size, self.min_scale, self.max_scale = kind, image_size, min_scale, max_scale
    self.random_flip, self.pad_value = random_flip, pad_value
    self.max_instances, self.mask_stride = max_instances, mask_stride
    self.with_masks = with_masks

  @classmethod
  def from_config(cls, config, with_masks: bool = True) -> 'TrainTransform':
    data_cfg = config.data
    return cls(
      kind=data_cfg.train_transform,
      image_size=int(data_cfg.image_size),
      min_scale=float(data_cfg.min_scale),
      max_scale=float(data_cfg.max_scale),
      random_flip=bool(data_cfg.random_flip),
      pad_value=int(data_cfg.pad_value),
      max_instances=int(data_cfg.max_instances),
      mask_stride=int(data_cfg.mask_stride),
      with_masks=with_masks,
    )

  def geometry(self, hw, rng: np.random.Generator):
    if self.kind == 'lsj':
      return lsj_geometry(hw, rng, self.image_size, self.min_scale, self.max_scale, self.random_flip)
    return resize_geometry(hw, rng, self.image_size, self.random_flip)

  def __call__(self, record: dict, rng: np.random.Generator) -> dict:
    try:
      return self._transform(record, rng)
    except DECODE_ERRORS as e:
      log.warning('image id %s: bad record skipped (%s: %s)', record.get('image_id'), type(e).__name__, e)
      return self.blank_example()

  def blank_example(self) -> dict:
    """A pad_value image with no targets and record_error True (what a bad record becomes)."""
    size, max_instances = self.image_size, self.max_instances
    out = {'image': np.full((size, size, 3), self.pad_value, np.uint8)}
    if self.with_masks:
      out.update(pack_targets([], np.zeros((0,), np.int32), (size, size), max_instances, self.mask_stride))
    else:
      out.update(pack_box_targets(np.zeros((0, 4)), np.zeros((0,), np.int32), (size, size), max_instances))
    out['record_error'] = np.bool_(True)
    return out

  def _transform(self, record: dict, rng: np.random.Generator) -> dict:
    image = decode_image(record['image'])
    h, w = image.shape[:2]
    if (h, w) != (int(record['height']), int(record['width'])):
      raise ValueError(f'decoded image is {h}x{w} but the record says {record["height"]}x{record["width"]}')
    keep = ~np.asarray(record['is_crowd'], bool)  # crowd regions are dropped for training
    labels = np.asarray(record['labels'], np.int32)[keep]
    canvas_hw = (self.image_size, self.image_size)
    flip, new_hw, offset = self.geometry((h, w), rng)
    canvas = apply_geometry(image, flip, new_hw, offset, canvas_hw, self.pad_value)
    if self.with_masks:
      masks = _LazyMasks([c for c, k in zip(record['masks'], keep) if k], h, w)
      canvas_masks = transform_masks(masks, flip, new_hw, offset, canvas_hw)
      targets = pack_targets(canvas_masks, labels, canvas_hw, self.max_instances, self.mask_stride)
    else:
      boxes = transform_boxes(np.asarray(record['boxes'], np.float32)[keep], (h, w), flip, new_hw, offset, canvas_hw)
      targets = pack_box_targets(boxes, labels, canvas_hw, self.max_instances)
    return {'image': canvas, **targets, 'record_error': np.bool_(False)}


def shortest_edge_hw(h: int, w: int, short_edge: int, max_size: int) -> tuple[int, int]:
  """detectron2 ResizeShortestEdge.get_output_shape: shortest side -> short_edge, longest <= max_size."""
  size = float(short_edge)
  scale = size / min(h, w)
  newh, neww = (size, scale * w) if h < w else (scale * h, size)
  if max(newh, neww) > max_size:
    scale = max_size / max(newh, neww)
    newh, neww = newh * scale, neww * scale
  return int(newh + 0.5), int(neww + 0.5)


def choose_canvas(hw, canvases: Sequence[Sequence[int]]) -> tuple[int, int]:
  """The smallest-area canvas (H, W) that holds an image of size hw (ties: the first listed)."""
  fits = [tuple(int(v) for v in c) for c in canvases if c[0] >= hw[0] and c[1] >= hw[1]]
  if not fits:
    raise ValueError(
      f'data.eval_canvases: no canvas in {[tuple(c) for c in canvases]} holds a {hw[0]}x{hw[1]} test image; '
      "add a larger canvas or evaluate in 'exact' mode"
    )
  return min(fits, key=lambda c: c[0] * c[1])


def exact_canvas(hw, divisibility: int = 32) -> tuple[int, int]:
  """hw rounded up to a multiple of `divisibility` (the official size_divisibility padding)."""
  return (math.ceil(hw[0] / divisibility) * divisibility, math.ceil(hw[1] / divisibility) * divisibility)


class EvalTransform:
  """(record or None, canvas) -> one evaluation example; None gives a filler (is_padding=True).

  Output: image uint8 (Hc, Wc, 3); image_id int64; image_hw int32 (2,) resized size inside the canvas (fillers:
  the canvas size); orig_hw int32 (2,) (fillers: the canvas size); is_padding bool; record_error bool: the
  record could not be decoded; it becomes a filler (is_padding True, its image_id kept), a warning names it, and
  the evaluation goes on (its ground truth then counts as missed).
  """

  def __init__(self, short_edge: int, max_size: int, pad_value=0):
    self.short_edge, self.max_size = short_edge, max_size
    self.pad_value = np.asarray(pad_value, np.uint8)

  def __call__(self, record: dict | None, canvas_hw) -> dict:
    hc, wc = canvas_hw
    canvas = np.empty((hc, wc, 3), np.uint8)
    canvas[...] = self.pad_value
    hw = np.array([hc, wc], np.int32)
    filler = {'image': canvas, 'image_id': np.int64(-1), 'image_hw': hw, 'orig_hw': hw, 'is_padding': np.bool_(True)}
    if record is None:
      return {**filler, 'record_error': np.bool_(False)}
    try:
      image = decode_image(record['image'])
      if 'height' in record and image.shape[:2] != (int(record['height']), int(record['width'])):
        raise ValueError(
          f'decoded image is {image.shape[0]}x{image.shape[1]}, the record says {record["height"]}x{record["width"]}'
        )
    except DECODE_ERRORS as e:
      log.warning('image id %s: bad record not evaluated (%s: %s)', record.get('image_id'), type(e).__name__, e)
      return {**filler, 'image_id': np.int64(record['image_id']), 'record_error': np.bool_(True)}
    h, w = image.shape[:2]
    nh, nw = shortest_edge_hw(h, w, self.short_edge, self.max_size)
    if nh > hc or nw > wc:
      raise ValueError(f'image id {record["image_id"]}: resized {nh}x{nw} does not fit its canvas {hc}x{wc}')
    canvas[:nh, :nw] = resize_image(image, (nh, nw))
    return {
      'image': canvas,
      'image_id': np.int64(record['image_id']),
      'image_hw': np.array([nh, nw], np.int32),
      'orig_hw': np.array([h, w], np.int32),
      'is_padding': np.bool_(False),
      'record_error': np.bool_(False),
    }
