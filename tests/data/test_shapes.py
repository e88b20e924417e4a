"""The synthetic shapes writer: deterministic, valid COCO, and the features the rest of the pipeline must handle."""

import collections
import filecmp
import json
import os

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO

from dimaskdino_jax.data import shapes


def _read(root, split):
  with open(os.path.join(root, 'annotations', f'instances_{split}.json')) as f:
    return json.load(f)


def test_deterministic_per_seed(tmp_path):
  a, b, c = (str(tmp_path / n) for n in 'abc')
  shapes.write_shapes_dataset(a, seed=3, num_train=12, num_val=4, image_size=64)
  shapes.write_shapes_dataset(b, seed=3, num_train=12, num_val=4, image_size=64)
  shapes.write_shapes_dataset(c, seed=4, num_train=12, num_val=4, image_size=64)
  for split in ('train', 'val'):
    assert _read(a, split) == _read(b, split)
    names = sorted(os.listdir(os.path.join(a, split)))
    assert names == sorted(os.listdir(os.path.join(b, split)))
    match, mismatch, errors = filecmp.cmpfiles(os.path.join(a, split), os.path.join(b, split), names, shallow=False)
    assert mismatch == [] and errors == [] and len(match) == len(names)
  assert _read(a, 'train')['annotations'] != _read(c, 'train')['annotations']
  # train and val are different images
  assert _read(a, 'train')['annotations'][:3] != _read(a, 'val')['annotations'][:3]


def test_valid_coco_with_crowd_empty_polygons_and_rles(shapes_raw):
  data = _read(shapes_raw, 'train')
  coco = COCO(os.path.join(shapes_raw, 'annotations', 'instances_train.json'))
  assert sorted(coco.getCatIds()) == [1, 3, 7]
  assert [c['name'] for c in coco.loadCats([1, 3, 7])] == ['circle', 'square', 'triangle']
  anns = data['annotations']
  assert len({a['id'] for a in anns}) == len(anns)
  crowd = [a for a in anns if a['iscrowd']]
  assert crowd and all(isinstance(a['segmentation'], dict) for a in crowd)
  assert any(isinstance(a['segmentation'], list) for a in anns)  # polygons
  assert any(isinstance(a['segmentation'], dict) and not a['iscrowd'] for a in anns)  # RLEs
  assert all(isinstance(a['segmentation']['counts'], str) for a in anns if isinstance(a['segmentation'], dict))
  per_image = collections.Counter(a['image_id'] for a in anns if not a['iscrowd'])
  empty = [im for im in data['images'] if im['id'] not in per_image and not coco.getAnnIds(imgIds=im['id'])]
  assert empty, 'no empty image'
  assert max(per_image.values()) <= 6
  sizes = {(im['height'], im['width']) for im in data['images']}
  assert len(sizes) > 5 and any(h != w for h, w in sizes)
  assert {os.path.splitext(im['file_name'])[1] for im in data['images']} == {'.jpg', '.png'}
  areas = np.array([a['area'] for a in anns if not a['iscrowd']])
  assert areas.min() < 32**2 and areas.max() > 20**2  # small and larger objects

  for im in data['images']:
    with Image.open(os.path.join(shapes_raw, 'train', im['file_name'])) as f:
      assert (f.height, f.width) == (im['height'], im['width'])
    union = np.zeros((im['height'], im['width']), np.int32)
    for a in coco.loadAnns(coco.getAnnIds(imgIds=im['id'])):
      m = coco.annToMask(a)
      assert m.sum() == a['area'] >= 4
      rle = mask_util.encode(np.asfortranarray(m))
      np.testing.assert_allclose(mask_util.toBbox(rle), a['bbox'], atol=0.01)
      union += m
    assert union.max() <= 1, 'visible masks of one image overlap: occlusion not applied'


def test_masks_match_pixels(shapes_raw):
  """Inside a PNG image (lossless) each unoccluded polygon shape is one colour (+ noise) unlike its surroundings."""
  data = _read(shapes_raw, 'train')
  checked = 0
  for a in data['annotations']:
    im = next(i for i in data['images'] if i['id'] == a['image_id'])
    if not im['file_name'].endswith('.png') or not isinstance(a['segmentation'], list) or a['area'] < 60:
      continue
    pixels = np.asarray(Image.open(os.path.join(shapes_raw, 'train', im['file_name'])).convert('RGB'), np.float32)
    m = mask_util.decode(mask_util.frPyObjects(a['segmentation'], im['height'], im['width']))[..., 0].astype(bool)
    inside = pixels[m]
    assert inside.std(axis=0).max() < 12  # one colour + N(0, 6) noise
    checked += 1
  assert checked >= 2


def test_cli(tmp_path, capsys):
  shapes.main(['--out', str(tmp_path), '--num-train', '3', '--num-val', '2', '--image-size', '48'])
  assert len(_read(str(tmp_path), 'train')['images']) == 3
  assert len(_read(str(tmp_path), 'val')['images']) == 2
  assert 'wrote 3 train + 2 val images' in capsys.readouterr().out
