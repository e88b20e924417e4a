"""prepare -> tfds array_record -> data source round trip, the ground truth for evaluation, ensure_shapes_dataset."""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from pycocotools.coco import COCO

from dimaskdino_jax.data import coco_format, prepare, tfds_builder
from dimaskdino_jax.data.tfds_builder import PreparedDataset

from .conftest import NUM_TRAIN, NUM_VAL, shapes_config


@pytest.mark.parametrize('split, num', [('train', NUM_TRAIN), ('val', NUM_VAL)])
def test_round_trip(shapes_raw, data_dir, split, num):
  src_json = os.path.join(shapes_raw, 'annotations', f'instances_{split}.json')
  src = COCO(src_json)
  ds = PreparedDataset(data_dir, 'shapes', split)
  assert len(ds) == num and len(ds.data_source) == num
  assert ds.label_map.category_ids == (1, 3, 7) and ds.category_names == ('circle', 'square', 'triangle')
  np.testing.assert_array_equal(ds.label_to_category_id, [1, 3, 7])
  np.testing.assert_array_equal(ds.index['image_id'], sorted(src.getImgIds()))
  # also readable through the generic tfds reader
  generic = tfds.builder_from_directory(ds.path).as_data_source(split)
  assert generic[0]['image_id'] == ds.data_source[0]['image_id']
  num_crowd = num_masks = 0
  for i in range(num):
    r = ds.data_source[i]
    image_id = int(r['image_id'])
    assert image_id == ds.index['image_id'][i]
    info = src.imgs[image_id]
    assert (int(r['height']), int(r['width'])) == (info['height'], info['width'])
    with open(os.path.join(shapes_raw, split, info['file_name']), 'rb') as f:
      assert r['image'] == f.read()
    anns = src.loadAnns(src.getAnnIds(imgIds=image_id))
    assert len(r['masks']) == len(anns) == ds.index['num_instances'][i]
    np.testing.assert_array_equal(r['ann_ids'], [a['id'] for a in anns])
    np.testing.assert_array_equal(ds.label_to_category_id[r['labels']], [a['category_id'] for a in anns])
    np.testing.assert_array_equal(r['is_crowd'], [bool(a['iscrowd']) for a in anns])
    assert ds.index['num_noncrowd'][i] == sum(not a['iscrowd'] for a in anns)
    xywh = np.array([a['bbox'] for a in anns], np.float32).reshape(-1, 4)
    np.testing.assert_allclose(r['boxes'], np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1), atol=1e-4)
    masks = coco_format.decode_rles(list(r['masks']), info['height'], info['width'])
    for m, a in zip(masks, anns):
      np.testing.assert_array_equal(m, src.annToMask(a))
    num_crowd += int(np.sum(r['is_crowd']))
    num_masks += len(anns)
  assert num_masks == len(src.getAnnIds())
  if split == 'train':
    assert num_crowd > 0

  gt = ds.coco()
  assert sorted(gt.getImgIds()) == sorted(src.getImgIds())
  assert sorted(gt.getAnnIds()) == sorted(src.getAnnIds())
  for ann_id in src.getAnnIds()[:20]:
    np.testing.assert_array_equal(gt.annToMask(gt.anns[ann_id]), src.annToMask(src.anns[ann_id]))
    assert gt.anns[ann_id]['iscrowd'] == src.anns[ann_id]['iscrowd']
  assert ds.metadata['skipped']['images']['counts'] == {}


def test_prepare_cli_and_skip_summary(tmp_path, shapes_raw, capsys):
  # Drop one image file: it is skipped and counted, the rest is prepared.
  images = tmp_path / 'images'
  images.mkdir()
  src = os.path.join(shapes_raw, 'val')
  names = sorted(os.listdir(src))
  for name in names[1:]:
    os.link(os.path.join(src, name), images / name)
  ann = os.path.join(shapes_raw, 'annotations', 'instances_val.json')
  out = str(tmp_path / 'data')
  argv = ['--images', str(images), '--annotations', ann, '--name', 'mine', '--split', 'val2017', '--data-dir', out]
  prepare.main([*argv, '--format', 'coco'])
  text = capsys.readouterr().out
  assert 'missing image file: 1' in text
  ds = PreparedDataset(out, 'mine', 'val2017')
  assert len(ds) == NUM_VAL - 1
  assert ds.metadata['skipped']['images']['counts'] == {'missing image file': 1}
  with open(ds.gt_json_path) as f:
    assert len(json.load(f)['images']) == NUM_VAL - 1
  prepare.main(argv)  # already prepared: kept
  assert 'already prepared' in capsys.readouterr().out
  with pytest.raises(SystemExit, match='annotation file not found'):
    prepare.main([*argv[:2], '--annotations', str(tmp_path / 'x.json'), *argv[4:], '--overwrite'])


def test_missing_prepared_dataset_says_how_to_prepare(tmp_path):
  with pytest.raises(coco_format.DatasetError, match='python -m dimaskdino_jax.data.prepare'):
    PreparedDataset(str(tmp_path), 'coco2017', 'val')


def test_ensure_shapes_dataset(tmp_path):
  config = shapes_config(str(tmp_path / 'cache'))
  config.data.image_size = 64
  assert prepare.ensure_shapes_dataset(config, num_train=6, num_val=3, verbose=False)
  assert tfds_builder.is_prepared(config.data.data_dir, 'shapes', 'train')
  assert len(PreparedDataset(config.data.data_dir, 'shapes', 'val')) == 3
  assert not prepare.ensure_shapes_dataset(config, num_train=6, num_val=3, verbose=False)  # nothing to do
  config.data.name = 'coco2017'
  assert not prepare.ensure_shapes_dataset(config, verbose=False)  # only for the shapes dataset
