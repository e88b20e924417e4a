"""LSJ / resize geometry on hand-made images, target packing, mask downsampling, test-time resize and canvases."""

import io

import numpy as np
import pytest
from PIL import Image

from dimaskdino_jax.data import coco_format, transforms


class ScriptedRng:
  """Stands in for np.random.Generator: returns scripted draws in order, checking which call is made."""

  def __init__(self, *draws):
    self._draws = list(draws)

  def random(self):
    kind, value = self._draws.pop(0)
    assert kind == 'random'
    return value

  def uniform(self, low, high):
    kind, value = self._draws.pop(0)
    assert kind == 'uniform'
    return low + value * (high - low)


def _png(image):
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='PNG')
  return buf.getvalue()


def _record(image, masks, labels, is_crowd=None):
  h, w = image.shape[:2]
  return {
    'image': _png(image),
    'image_id': 5,
    'height': h,
    'width': w,
    'labels': np.asarray(labels, np.int32),
    'is_crowd': np.zeros(len(labels), bool) if is_crowd is None else np.asarray(is_crowd),
    'masks': np.array([coco_format.encode_mask(m)['counts'].encode() for m in masks], dtype=object),
  }


def _hand_made():
  """40 x 80 image: left half red, right half blue; mask A = rows 10:20 x cols 0:20, B = rows 10:20 x cols 40:60."""
  image = np.zeros((40, 80, 3), np.uint8)
  image[:, :40] = (255, 0, 0)
  image[:, 40:] = (0, 0, 255)
  a = np.zeros((40, 80), np.uint8)
  a[10:20, 0:20] = 1
  b = np.zeros((40, 80), np.uint8)
  b[10:20, 40:60] = 1
  return image, a, b


def _lsj(**kw):
  args = dict(
    kind='lsj',
    image_size=64,
    min_scale=0.0,
    max_scale=1.0,
    random_flip=True,
    pad_value=128,
    max_instances=4,
    mask_stride=1,
  )
  args.update(kw)
  return transforms.TrainTransform(**args)


def test_lsj_flip_downscale_pad():
  image, a, b = _hand_made()
  # flip (0.3 < 0.5); scale 0.5 -> fits 32 x 32: factor min(32/40, 32/80) = 0.4 -> 16 x 32; no crop needed.
  rng = ScriptedRng(('random', 0.3), ('uniform', 0.5), ('uniform', 0.9))
  out = _lsj()(_record(image, [a, b], [1, 2]), rng)
  img = out['image']
  assert img.shape == (64, 64, 3) and img.dtype == np.uint8
  assert (img[16:] == 128).all() and (img[:, 32:] == 128).all()  # bottom/right padding
  np.testing.assert_array_equal(img[:, :14][:16], np.broadcast_to([0, 0, 255], (16, 14, 3)))  # flipped: blue left
  np.testing.assert_array_equal(img[:, 18:32][:16], np.broadcast_to([255, 0, 0], (16, 14, 3)))
  # A (cols 0:20) -> flipped cols 60:80 -> x 24:32, rows 10:20 -> y 4:8 ; B -> cols 20:40 -> x 8:16
  assert out['valid'].tolist() == [True, True, False, False]
  assert out['labels'].tolist() == [1, 2, 0, 0]
  np.testing.assert_allclose(out['boxes'][0], [28 / 64, 6 / 64, 8 / 64, 4 / 64])
  np.testing.assert_allclose(out['boxes'][1], [12 / 64, 6 / 64, 8 / 64, 4 / 64])
  assert out['masks'][0].sum() == 8 * 4 and out['masks'][0][4:8, 24:32].all()
  assert (out['boxes'][2:] == 0).all() and (out['masks'][2:] == 0).all() and out['num_dropped'] == 0


def test_lsj_upscale_random_crop_filters_empty():
  image, a, b = _hand_made()
  # no flip; scale 2 -> fits 128 x 128: factor 1.6 -> 64 x 128; crop offset round((0, 64) * 0.5) = (0, 32).
  rng = ScriptedRng(('random', 0.7), ('uniform', 1.0), ('uniform', 0.5))
  t = _lsj(max_scale=2.0, min_scale=0.0)
  flip, new_hw, offset = t.geometry((40, 80), ScriptedRng(('random', 0.7), ('uniform', 1.0), ('uniform', 0.5)))
  assert (flip, new_hw, offset) == (False, (64, 128), (0, 32))
  out = t(_record(image, [a, b], [1, 2]), rng)
  img = out['image']
  assert (img != 128).any(axis=2).all()  # the crop fills the canvas: no padding
  np.testing.assert_array_equal(img[:, :30], np.broadcast_to([255, 0, 0], (64, 30, 3)))  # resized cols 32..62: red
  np.testing.assert_array_equal(img[:, 34:], np.broadcast_to([0, 0, 255], (64, 30, 3)))
  # A -> resized cols 0:32, cropped away -> filtered; B -> cols 64:96 -> 32:64, rows 16:32.
  assert out['valid'].tolist() == [True, False, False, False] and out['labels'][0] == 2
  np.testing.assert_allclose(out['boxes'][0], [0.75, 0.375, 0.5, 0.25])
  assert out['masks'][0][16:32, 32:64].all() and out['masks'][0].sum() == 16 * 32


def test_lsj_rounding_matches_detectron2():
  # ResizeScale uses np.round on (h, w) * min(S s / h, S s / w); FixedSizeCrop one uniform for both axes.
  flip, hw, off = transforms.lsj_geometry(
    (480, 640), ScriptedRng(('random', 0.5), ('uniform', 0.7), ('uniform', 0.25)), 1024, 0.1, 2.0, True
  )
  scale = 0.1 + 0.7 * 1.9
  factor = min(1024 * scale / 480, 1024 * scale / 640)
  assert flip is False
  assert hw == (int(np.round(480 * factor)), int(np.round(640 * factor))) == (1098, 1464)
  assert off == (18, 110)  # np.round((74, 440) * 0.25): 18.5 rounds to even, like detectron2
  assert transforms.lsj_geometry((480, 640), np.random.default_rng(0), 1024, 0.1, 2.0, False)[0] is False


def test_resize_transform_and_crowd_dropped():
  image, a, b = _hand_made()
  t = transforms.TrainTransform(kind='resize', image_size=64, random_flip=False, max_instances=4, mask_stride=2)
  out = t(_record(image, [a, b, a], [0, 1, 2], is_crowd=[False, True, False]), np.random.default_rng(0))
  # longest side 80 -> 64: 32 x 64, padded to 64 x 64 at the bottom
  assert (out['image'][32:] == 128).all() and (out['image'][:32] != 128).any(axis=2).all()
  assert out['labels'].tolist()[:2] == [0, 2] and out['valid'].tolist() == [True, True, False, False]
  np.testing.assert_allclose(out['boxes'][0], [8 / 64, 12 / 64, 16 / 64, 8 / 64])
  assert out['masks'].shape == (4, 32, 32)
  assert out['masks'][0][4:8, 0:8].all() and out['masks'][0].sum() == 32


def test_max_instances_keeps_largest():
  image = np.zeros((32, 32, 3), np.uint8)
  masks = []
  for i, size in enumerate([2, 6, 3, 8, 4]):
    m = np.zeros((32, 32), np.uint8)
    m[i * 6 : i * 6 + size, 0:size] = 1
    masks.append(m)
  t = transforms.TrainTransform(kind='resize', image_size=32, random_flip=False, max_instances=3, mask_stride=1)
  out = t(_record(image, masks, [0, 1, 2, 3, 4]), np.random.default_rng(0))
  assert out['labels'].tolist() == [1, 3, 4] and out['valid'].all() and out['num_dropped'] == 2


def test_downsample_area_average():
  m = np.zeros((1, 4, 6), bool)
  m[0, 0:2, 0:1] = True  # 2 of 4 pixels of cell (0, 0): kept
  m[0, 0, 2] = True  # 1 of 4 of cell (0, 1): dropped
  m[0, 2:4, 4:6] = True  # full cell (1, 2)
  out = transforms.downsample_masks(m, (8, 8), 2)
  assert out.shape == (1, 4, 4)
  expected = np.zeros((4, 4), np.uint8)
  expected[0, 0] = expected[1, 2] = 1
  np.testing.assert_array_equal(out[0], expected)


def test_masks_to_boxes():
  m = np.zeros((2, 5, 6), bool)
  m[0, 1:3, 2:5] = True
  np.testing.assert_array_equal(transforms.masks_to_boxes(m), [[2, 1, 5, 3], [0, 0, 0, 0]])


def test_test_resize_and_canvases():
  assert transforms.shortest_edge_hw(480, 640, 800, 1333) == (800, 1067)
  assert transforms.shortest_edge_hw(640, 480, 800, 1333) == (1067, 800)
  assert transforms.shortest_edge_hw(100, 1000, 800, 1333) == (133, 1333)
  assert transforms.shortest_edge_hw(500, 500, 800, 1333) == (800, 800)
  canvases = ((800, 1344), (1344, 800), (800, 800), (1344, 1344))
  assert transforms.choose_canvas((800, 1067), canvases) == (800, 1344)
  assert transforms.choose_canvas((1067, 800), canvases) == (1344, 800)
  assert transforms.choose_canvas((800, 800), canvases) == (800, 800)
  assert transforms.choose_canvas((900, 850), canvases) == (1344, 1344)
  with pytest.raises(ValueError, match='data.eval_canvases'):
    transforms.choose_canvas((1400, 10), canvases)
  assert transforms.exact_canvas((800, 1067)) == (800, 1088)


def test_eval_transform():
  image = np.full((40, 80, 3), 200, np.uint8)
  t = transforms.EvalTransform(32, 48, pad_value=(124, 116, 104))
  out = t({'image': _png(image), 'image_id': 9}, (32, 64))
  assert out['image_hw'].tolist() == [24, 48] and out['orig_hw'].tolist() == [40, 80] and not out['is_padding']
  assert (out['image'][:24, :48] == 200).all()
  assert (out['image'][24:] == [124, 116, 104]).all() and (out['image'][:, 48:] == [124, 116, 104]).all()
  filler = t(None, (32, 64))
  assert filler['is_padding'] and filler['image_id'] == -1 and filler['image'].shape == (32, 64, 3)
