"""Bad records on generated files: each is skipped or repaired, counted by reason, and never stops a run."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from dimaskdino_jax.data import coco_format as cf
from dimaskdino_jax.data import pipeline, prepare, transforms
from dimaskdino_jax.data.tfds_builder import PreparedDataset

from .conftest import shapes_config

H, W = 24, 32  # the size of the plain test images


def _square(x, y, s):
  return [x, y, x + s, y, x + s, y + s, x, y + s]


def _rgb(seed, h=H, w=W):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save_exif_jpeg(path, pixels, orientation):
  exif = Image.Exif()
  exif[0x0112] = orientation
  Image.fromarray(pixels).save(path, 'JPEG', quality=95, exif=exif.tobytes())


def _write_messy(root):
  """An images dir + instances json with one instance of every bad-record kind; returns (json path, image dir)."""
  img = os.path.join(root, 'images')
  os.makedirs(img)
  Image.fromarray(_rgb(0)).save(os.path.join(img, 'good.png'))
  Image.fromarray(_rgb(1)).save(os.path.join(img, 'dup.png'))
  Image.fromarray(_rgb(2)[..., 0]).save(os.path.join(img, 'gray.png'))  # L
  rgba = np.concatenate([_rgb(3), np.full((H, W, 1), 7, np.uint8)], axis=2)
  Image.fromarray(rgba, 'RGBA').save(os.path.join(img, 'rgba.png'))
  Image.new('CMYK', (W, H), (0, 255, 0, 0)).save(os.path.join(img, 'cmyk.jpg'), 'JPEG', quality=100)
  deep = np.zeros((H, W), np.uint16)
  deep[:, : W // 3], deep[:, W // 3 : 2 * W // 3], deep[:, 2 * W // 3 :] = 0, 128 * 257, 65535
  Image.fromarray(deep).save(os.path.join(img, 'deep16.png'))  # I;16
  raw = _rgb(4)  # stored 24 x 32; orientation 6 displays it rotated 90 degrees clockwise, 32 x 24
  _save_exif_jpeg(os.path.join(img, 'exif_applied.jpg'), raw, 6)
  _save_exif_jpeg(os.path.join(img, 'exif_ignored.jpg'), raw, 6)
  _save_exif_jpeg(os.path.join(img, 'exif_flip.jpg'), raw, 3)
  buf = io.BytesIO()
  Image.fromarray(_rgb(5)).save(buf, 'JPEG')
  with open(os.path.join(img, 'truncated.jpg'), 'wb') as f:
    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
  with open(os.path.join(img, 'garbage.png'), 'wb') as f:
    f.write(b'this is not an image' * 10)
  Image.fromarray(_rgb(6, 10, 10)).save(os.path.join(img, 'small.png'))  # the json says 24 x 32
  Image.fromarray(_rgb(7, 2 * H, 2 * W)).save(os.path.join(img, 'large.png'))  # over the limit in one test

  def image(i, name, h=H, w=W):
    return {'id': i, 'file_name': name, 'height': h, 'width': w}

  images = [
    image(1, 'good.png'),
    image(1, 'dup.png'),  # duplicate image id
    image(2, 'gray.png'),
    image(3, 'rgba.png'),
    image(4, 'cmyk.jpg'),
    image(5, 'deep16.png'),
    image(6, 'exif_applied.jpg', W, H),  # the json describes the rotated image
    image(7, 'exif_ignored.jpg'),  # the json describes the stored pixels
    image(8, 'exif_flip.jpg'),  # 180 degrees: same size, applied
    image(9, 'truncated.jpg'),
    image(10, 'garbage.png'),
    image(11, 'missing.png'),
    image(12, 'small.png'),
    {'id': 13, 'file_name': 'x.png', 'height': 'tall', 'width': W},  # malformed entry
    image(14, 'large.png', 2 * H, 2 * W),
  ]
  good = [_square(4, 4, 8)]
  rle = mask_util.encode(np.asfortranarray(np.pad(np.ones((5, 5), np.uint8), ((2, H - 7), (3, W - 8)))))
  uncompressed_bad = {'size': [H, W], 'counts': [10, 20, 30]}  # runs add up to 60, not 768

  def ann(i, image_id=1, seg=good, bbox=(4, 4, 8, 8), cat=1, **kw):
    a = {'id': i, 'image_id': image_id, 'category_id': cat, 'bbox': list(bbox) if isinstance(bbox, tuple) else bbox}
    if seg is not None:
      a['segmentation'] = seg
    return {**a, 'area': 64.0, 'iscrowd': 0, **kw}

  anns = [
    ann(1),  # good
    ann(2, bbox=(20, 10, 20, 5), seg=[_square(20, 10, 4)]),  # box partly outside: clipped to (20, 10, 12, 5)
    ann(3, bbox=(40, 40, 5, 5)),  # box entirely outside the image
    ann(4, bbox=(4, 4, 0, 8)),  # zero-area box
    ann(5, bbox='4 4 8 8'),  # malformed box
    ann(6, seg=[]),  # empty segmentation
    ann(7, seg='a polygon'),  # malformed segmentation
    ann(8, seg=[[1, 1, 'x', 2, 3, 3]]),  # malformed polygon
    ann(9, seg=[[1, 1, 5, 1]]),  # polygon with 2 points
    ann(10, seg=[_square(2, 2, 6), [1, 1]]),  # a bad part inside a valid list: dropped, counted as a repair
    ann(11, seg={'size': [H, W], 'counts': 'zzzz'}),  # runs do not add up to the image
    ann(12, seg={'size': [H, W]}),  # RLE without counts
    ann(13, seg=None),  # no segmentation key (the file has segmentations elsewhere)
    ann(14, cat=99),  # unknown category id
    ann('fourteen'),  # malformed id
    ann(1, image_id=2),  # duplicate annotation id
    ann(17, image_id=999),  # unknown image id
    ann(18, seg=uncompressed_bad),
    ann(19, seg={'size': [H, W], 'counts': rle['counts'].decode()}),  # good RLE
    ann(20, seg=[_square(30, 20, 6)], bbox=(30, 20, 6, 6)),  # polygon almost outside: clipped mask, box clipped
    ann(21, seg=[_square(40, 40, 4)], bbox=(2, 2, 4, 4)),  # the polygon lies outside: empty mask
  ]
  anns += [ann(100 + i, image_id=i) for i in range(2, 15)]  # one good instance on every other image
  data = {'images': images, 'annotations': anns, 'categories': [{'id': 1, 'name': 'thing'}, {'id': 2, 'name': 'b'}]}
  path = os.path.join(root, 'instances.json')
  with open(path, 'w') as f:
    json.dump(data, f)
  return path, img


@pytest.fixture(scope='module')
def messy(tmp_path_factory):
  return _write_messy(str(tmp_path_factory.mktemp('messy')))


@pytest.fixture(scope='module')
def messy_prepared(messy, tmp_path_factory):
  path, img = messy
  out = str(tmp_path_factory.mktemp('messy_prepared'))
  prepare.prepare_dataset(img, path, 'messy', 'train', out, verbose=False)
  return PreparedDataset(out, 'messy', 'train')


SKIPPED_IMAGES = {
  cf.DUPLICATE_IMAGE_ID: 1,
  cf.UNREADABLE_IMAGE: 2,
  cf.MISSING_IMAGE_FILE: 1,
  cf.IMAGE_SIZE_MISMATCH: 1,
  cf.MALFORMED_IMAGE_ENTRY: 1,
}
SKIPPED_ANNOTATIONS = {
  cf.BOX_OUTSIDE_IMAGE: 1,
  cf.ZERO_AREA_BOX: 1,
  cf.MALFORMED_BOX: 1,
  cf.EMPTY_SEGMENTATION: 1,
  cf.MALFORMED_SEGMENTATION: 3,
  cf.BAD_POLYGON: 1,
  cf.MALFORMED_RLE: 2,
  cf.MISSING_SEGMENTATION: 1,
  cf.UNKNOWN_CATEGORY_ID: 1,
  cf.MALFORMED_ANNOTATION: 1,
  cf.DUPLICATE_ANNOTATION_ID: 1,
  cf.UNKNOWN_IMAGE_ID: 1,
  cf.EMPTY_MASK: 1,
}


def test_every_bad_record_is_counted_by_reason(messy, capsys):
  path, img = messy
  ds = cf.load_coco_instances(path, img)
  assert dict(ds.skipped_images.counts) == SKIPPED_IMAGES
  assert dict(ds.skipped_annotations.counts) == SKIPPED_ANNOTATIONS
  assert dict(ds.repaired_images.counts) == {
    cf.GRAYSCALE_IMAGE: 1,
    cf.ALPHA_IMAGE: 1,
    cf.CMYK_IMAGE: 1,
    cf.HIGH_BIT_DEPTH_IMAGE: 1,
    cf.EXIF_APPLIED: 2,
    cf.EXIF_IGNORED: 1,
  }
  assert dict(ds.repaired_annotations.counts) == {cf.BOX_CLIPPED: 2, cf.POLYGON_PART_DROPPED: 1}
  # nothing vanishes: every image entry and annotation is kept, skipped, or belongs to a skipped image
  with open(path) as f:
    raw = json.load(f)
  assert len(ds.images) + ds.skipped_images.total == len(raw['images'])
  kept_ids = {r.image_id for r in ds.images}
  on_skipped = sum(1 for a in raw['annotations'] if a['image_id'] in (9, 10, 11, 12, 13))
  assert ds.num_annotations + ds.skipped_annotations.total + on_skipped == len(raw['annotations'])
  assert kept_ids == {1, 2, 3, 4, 5, 6, 7, 8, 14}
  out = capsys.readouterr().out
  for reason, n in {**SKIPPED_IMAGES, **SKIPPED_ANNOTATIONS}.items():
    assert f'{reason}: {n}' in out, reason
  assert 'skipped 7 images' not in out and 'skipped 6 images' in out and 'repaired 7 images' in out
  good = next(r for r in ds.images if r.image_id == 1)
  by_id = {a.ann_id: a for a in good.annotations}
  assert sorted(by_id) == [1, 2, 10, 19, 20]
  assert by_id[2].bbox == (20.0, 10.0, 12.0, 5.0) and by_id[1].bbox == (4.0, 4.0, 8.0, 8.0)
  assert by_id[20].bbox == (30.0, 20.0, 2.0, 4.0)
  expected = mask_util.decode(mask_util.frPyObjects([_square(2, 2, 6)], H, W))[..., 0]
  np.testing.assert_array_equal(cf.decode_rles([by_id[10].rle['counts']], H, W)[0], expected)


def test_too_large_image_is_skipped(messy, monkeypatch):
  path, img = messy
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', H * W)  # PIL refuses images over twice this: only large.png
  ds = cf.load_coco_instances(path, img, verbose=False)
  assert dict(ds.skipped_images.counts) == {**SKIPPED_IMAGES, cf.IMAGE_TOO_LARGE: 1}
  assert 14 not in {r.image_id for r in ds.images}


def test_prepared_pixels_are_repaired(messy, messy_prepared):
  _, img = messy
  ds = messy_prepared
  record_of = {int(i): k for k, i in enumerate(ds.index['image_id'])}

  def pixels(image_id):
    return transforms.decode_image(ds.data_source[record_of[image_id]]['image'])

  gray = np.asarray(Image.open(os.path.join(img, 'gray.png')))
  np.testing.assert_array_equal(pixels(2), np.repeat(gray[..., None], 3, axis=2))
  np.testing.assert_array_equal(pixels(3), _rgb(3))  # alpha dropped
  cmyk = pixels(4).astype(int)  # (C, M, Y, K) = (0, 255, 0, 0) is magenta
  assert np.abs(cmyk - [255, 0, 255]).max() <= 8
  deep = pixels(5)
  assert deep.shape == (H, W, 3) and (deep[:, 0] == 0).all() and (deep[:, -1] == 255).all()
  assert (deep[:, W // 2] == 128).all()  # 128 * 257 / 65535 * 255 = 128: scaled, not clipped at 255
  raw = np.asarray(Image.open(os.path.join(img, 'exif_applied.jpg')))  # the stored (unrotated) pixels
  assert raw.shape == (H, W, 3)
  np.testing.assert_array_equal(pixels(6), np.rot90(raw, k=-1))  # orientation 6: rotated 90 degrees clockwise
  np.testing.assert_array_equal(pixels(7), raw)  # json size = stored size: orientation ignored
  np.testing.assert_array_equal(pixels(8), raw[::-1, ::-1])  # orientation 3: 180 degrees
  for image_id in ds.index['image_id']:
    r = ds.data_source[record_of[int(image_id)]]
    assert pixels(int(image_id)).shape == (int(r['height']), int(r['width']), 3)
  meta = ds.metadata
  assert meta['skipped']['images']['counts'] == SKIPPED_IMAGES
  assert meta['repaired']['annotations']['counts'] == {cf.BOX_CLIPPED: 2, cf.POLYGON_PART_DROPPED: 1}
  gt = {a['id']: a for a in ds.coco().dataset['annotations']}
  assert gt[2]['bbox'] == [20.0, 10.0, 12.0, 5.0]  # the evaluation ground truth has the clipped box


def test_rle_counts_parser_matches_pycocotools():
  rng = np.random.default_rng(0)
  for _ in range(20):
    h, w = rng.integers(1, 40, 2)
    m = (rng.random((h, w)) < rng.random()).astype(np.uint8)
    counts = mask_util.encode(np.asfortranarray(m))['counts'].decode()
    runs = cf.rle_counts_from_string(counts)
    flat = np.repeat(np.arange(len(runs)) % 2, runs).astype(np.uint8)  # runs alternate 0, 1, 0, ...
    np.testing.assert_array_equal(flat.reshape(w, h).T, m)
  for bad in ('zz', '0{', 'a' * 3 + '\x7f', 'a'):
    with pytest.raises(ValueError):
      cf.rle_counts_from_string(bad)


def test_loader_survives_undecodable_records(messy, tmp_path):
  """Without the file check at prepare, corrupt bytes reach the loader: flagged, blank, and the run goes on."""
  path, img = messy
  out = str(tmp_path)
  prepare.prepare_dataset(img, path, 'unchecked', 'train', out, check_files=False, verbose=False)
  prepared = PreparedDataset(out, 'unchecked', 'train')
  ids = prepared.index['image_id'].tolist()
  present = {f for f in os.listdir(img)}
  with open(path) as f:
    names = {im['id']: im['file_name'] for im in json.load(f)['images'] if isinstance(im['height'], int)}
  # unchecked: only entries whose file is missing cannot be stored; the unreadable and wrongly sized ones are
  assert set(ids) == {i for i, n in names.items() if n in present}
  # truncated, garbage, a 10 x 10 file for a 24 x 32 entry, and the EXIF image whose json size is the rotated one
  # (unchecked, nothing applies the orientation: the stored pixels do not match the record)
  bad = {6, 9, 10, 12}
  config = shapes_config(out, name='unchecked', max_instances=4, filter_empty=False)
  config.model.num_classes = 2
  config.train.batch_size = len(ids)  # one batch = one epoch (a permutation of every record)
  batch = next(pipeline.make_train_iterator(config, verbose=False))
  assert batch['record_error'].sum() == len(bad)
  errors = batch['record_error']
  assert (batch['image'][errors] == config.data.pad_value).all() and not batch['valid'][errors].any()
  assert batch['valid'][~errors].any(axis=1).all()
  config.data.val_split = 'train'
  loader = pipeline.EvalLoader(config, batch_size=4)
  seen, flagged = set(), set()
  for b in loader:
    seen |= set(b['image_id'][~b['is_padding']].tolist())
    flagged |= set(b['image_id'][b['record_error']].tolist())
  assert flagged == bad and seen == set(ids) - bad
