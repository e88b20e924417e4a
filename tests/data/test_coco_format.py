"""COCO json reading: label mapping, bad records skipped and counted, clear errors for broken files."""

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from dimaskdino_jax.data import coco_format
from dimaskdino_jax.data.coco_format import DatasetError, LabelMap


def test_label_map_round_trip():
  lm = LabelMap.from_categories([{'id': 7, 'name': 'triangle'}, {'id': 1, 'name': 'circle'}, {'id': 3, 'name': 'sq'}])
  assert lm.category_ids == (1, 3, 7) and lm.names == ('circle', 'sq', 'triangle') and lm.num_classes == 3
  assert [lm.to_label(c) for c in (1, 3, 7)] == [0, 1, 2]
  assert [lm.to_category_id(i) for i in range(3)] == [1, 3, 7]
  np.testing.assert_array_equal(lm.labels_to_category_ids(np.array([[2, 0], [1, 1]])), [[7, 1], [3, 3]])
  assert LabelMap.from_json(json.loads(json.dumps(lm.to_json()))) == lm
  with pytest.raises(KeyError):
    lm.to_label(2)


def _write_image(path, h, w):
  Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(path)


def _square(x, y, s):
  return [x, y, x + s, y, x + s, y + s, x, y + s]


@pytest.fixture
def messy(tmp_path):
  """3 image entries (one file missing, one with a wrong size), annotations with every kind of defect."""
  img_dir = tmp_path / 'images'
  img_dir.mkdir()
  _write_image(img_dir / 'a.png', 20, 30)
  _write_image(img_dir / 'b.png', 16, 16)
  _write_image(img_dir / 'd.png', 10, 10)  # json says 12 x 10
  crowd = np.zeros((16, 16), np.uint8)
  crowd[2:6, 3:9] = 1
  uncompressed = {'size': [16, 16], 'counts': []}  # uncompressed (list) RLE, as COCO crowd regions are
  flat = crowd.flatten(order='F')
  value, run = 0, 0
  for v in flat:
    if v != value:
      uncompressed['counts'].append(run)
      value, run = v, 0
    run += 1
  uncompressed['counts'].append(run)
  good_rle = mask_util.encode(np.asfortranarray(crowd))
  good_rle = {'size': [16, 16], 'counts': good_rle['counts'].decode()}
  ann = lambda i, img, cat, seg, bbox=(1, 1, 4, 4), **kw: {
    'id': i,
    'image_id': img,
    'category_id': cat,
    'segmentation': seg,
    'bbox': list(bbox),
    'area': 16.0,
    **kw,
  }
  data = {
    'images': [
      {'id': 10, 'file_name': 'a.png', 'height': 20, 'width': 30},
      {'id': 11, 'file_name': 'b.png', 'height': 16, 'width': 16},
      {'id': 12, 'file_name': 'missing.png', 'height': 16, 'width': 16},
      {'id': 13, 'file_name': 'd.png', 'height': 12, 'width': 10},
    ],
    'categories': [{'id': 5, 'name': 'five'}, {'id': 2, 'name': 'two'}],
    'annotations': [
      ann(1, 10, 5, [_square(2, 2, 6)]),  # good polygon
      ann(2, 10, 2, [_square(10, 4, 5), [1, 1, 2, 2]]),  # good: the 2-point polygon inside is dropped
      ann(3, 11, 2, uncompressed, iscrowd=1),  # good crowd (uncompressed RLE)
      ann(4, 11, 5, good_rle),  # good compressed RLE
      ann(5, 10, 9, [_square(2, 2, 6)]),  # unknown category id
      ann(6, 10, 5, [_square(2, 2, 6)], bbox=(2, 2, 0, 6)),  # zero-area box
      ann(7, 10, 5, [[1, 1, 5, 1]]),  # polygon with 2 points
      ann(8, 12, 5, [_square(2, 2, 6)]),  # image file missing: dropped with its image, not counted again
      ann(9, 99, 5, [_square(2, 2, 6)]),  # unknown image id
      ann(10, 11, 5, {'size': [8, 8], 'counts': good_rle['counts']}),  # RLE size != image size
      ann(11, 10, 5, [_square(40, 40, 3)]),  # polygon outside the image: empty mask
    ],
  }
  path = tmp_path / 'instances.json'
  path.write_text(json.dumps(data))
  return str(path), str(img_dir), crowd


def test_bad_records_skipped_and_counted(messy, capsys):
  path, img_dir, crowd = messy
  ds = coco_format.load_coco_instances(path, img_dir)
  assert ds.skipped_images.counts == {coco_format.MISSING_IMAGE_FILE: 1, coco_format.IMAGE_SIZE_MISMATCH: 1}
  assert ds.skipped_annotations.counts == {
    coco_format.UNKNOWN_CATEGORY_ID: 1,
    coco_format.ZERO_AREA_BOX: 1,
    coco_format.BAD_POLYGON: 1,
    coco_format.UNKNOWN_IMAGE_ID: 1,
    coco_format.RLE_SIZE_MISMATCH: 1,
    coco_format.EMPTY_MASK: 1,
  }
  out = capsys.readouterr().out
  for text in (
    'skipped 2 images',
    'skipped 6 annotations',
    'missing image file: 1',
    'zero-area box: 1',
    'polygon with < 3 points: 1',
    'unknown category id: 1',
    'annotation id 5 (category id 9)',
  ):
    assert text in out, text
  assert [r.image_id for r in ds.images] == [10, 11]
  assert ds.label_map.category_ids == (2, 5)
  a, b = ds.images
  assert [(x.ann_id, x.label, x.iscrowd) for x in a.annotations] == [(1, 1, False), (2, 0, False)]
  assert [(x.ann_id, x.label, x.iscrowd) for x in b.annotations] == [(3, 0, True), (4, 1, False)]
  assert a.num_noncrowd == 2 and b.num_noncrowd == 1
  masks = coco_format.decode_rles([x.rle['counts'] for x in b.annotations], 16, 16)
  np.testing.assert_array_equal(masks[0], crowd)  # the uncompressed crowd RLE decodes to the same mask
  np.testing.assert_array_equal(masks[1], crowd)
  m = coco_format.decode_rles([a.annotations[0].rle['counts']], 20, 30)[0]
  expected = mask_util.decode(mask_util.frPyObjects([_square(2, 2, 6)], 20, 30))[..., 0]
  np.testing.assert_array_equal(m, expected)
  gt = ds.to_coco_json()
  assert [im['id'] for im in gt['images']] == [10, 11] and len(gt['annotations']) == 4


def test_invalid_json_names_the_file(tmp_path):
  path = tmp_path / 'broken.json'
  path.write_text('{"images": [], "annotations": [,]}')
  with pytest.raises(DatasetError, match=r'broken\.json: invalid JSON at line 1'):
    coco_format.load_coco_instances(str(path), str(tmp_path))
  with pytest.raises(DatasetError, match='not found'):
    coco_format.load_coco_instances(str(tmp_path / 'nope.json'), str(tmp_path))


@pytest.mark.parametrize(
  'data, key',
  [
    ({'images': [], 'annotations': []}, "missing key 'categories' in the top-level object"),
    ({'images': [], 'categories': [{'id': 1, 'name': 'a'}]}, "missing key 'annotations'"),
    (
      {
        'images': [{'id': 1, 'file_name': 'x.png', 'width': 3}],
        'annotations': [],
        'categories': [{'id': 1, 'name': 'a'}],
      },
      r"missing key 'height' in images\[0\]",
    ),
    (
      {
        'images': [],
        'annotations': [{'id': 1, 'image_id': 1, 'bbox': [0, 0, 1, 1]}],
        'categories': [{'id': 1, 'name': 'a'}],
      },
      r"missing key 'category_id' in annotations\[0\]",
    ),
    ({'images': [], 'annotations': [], 'categories': [{'name': 'a'}]}, r"missing key 'id' in categories\[0\]"),
  ],
)
def test_missing_key_names_the_file_and_key(tmp_path, data, key):
  path = tmp_path / 'instances_x.json'
  path.write_text(json.dumps(data))
  with pytest.raises(DatasetError, match=key) as e:
    coco_format.load_coco_instances(str(path), str(tmp_path))
  assert str(path) in str(e.value)
