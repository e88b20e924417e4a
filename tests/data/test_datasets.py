"""Real-dataset configs and custom data: BDD100K schedule, class counts from the file, detection-only data, the
prepare CLI's NAME_SPLIT form, non-square and large images."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from dimaskdino_jax.config import load_config
from dimaskdino_jax.data import pipeline, prepare, transforms
from dimaskdino_jax.data.coco_format import DatasetError
from dimaskdino_jax.data.tfds_builder import PreparedDataset

from .conftest import REPO, shapes_config

# (height, width) of the generated detection-only images: non-square both ways, one of 4.3 megapixels
SIZES = {1: (1800, 2400), 2: (150, 1500), 3: (400, 90), 4: (64, 64)}
NUM_CATEGORIES = 5


def test_bdd100k_config_schedule():
  config = load_config(os.path.join(REPO, 'configs', 'dimaskdino_r50_bdd100k.py'))
  coco = load_config(os.path.join(REPO, 'configs', 'dimaskdino_r50_coco.py'))
  # the paper's BDD100K schedule (appendix B.2): 68 epochs at batch 8, lr x0.1 at epoch 50; 7,000 train images
  steps_per_epoch = 7000 / 8
  assert config.train.batch_size == 8
  assert config.train.num_steps == 68 * steps_per_epoch
  assert tuple(config.optim.lr_drop_steps) == (50 * steps_per_epoch,)
  assert config.model.num_classes == 8
  model, coco_model = config.model.to_dict(), coco.model.to_dict()
  model.pop('num_classes'), coco_model.pop('num_classes')
  assert model == coco_model  # the same model
  assert config.data.name == 'bdd100k_ins_seg' and config.data.train_transform == 'lsj'
  hw = transforms.shortest_edge_hw(720, 1280, config.data.test_short_edge, config.data.test_max_size)
  assert transforms.choose_canvas(hw, config.data.eval_canvases) == (768, 1344)  # BDD100K's 1280 x 720 frames


def _category(image_id, k):
  return 11 + (image_id - 1 + k) % NUM_CATEGORIES


def _write_detection_only(root):
  img = os.path.join(root, 'images')
  os.makedirs(img)
  rng = np.random.default_rng(0)
  images, anns = [], []
  for image_id, (h, w) in SIZES.items():
    name = f'{image_id}.{"jpg" if h * w > 1e6 else "png"}'
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(img, name))
    images.append({'id': image_id, 'file_name': name, 'height': h, 'width': w})
    for k in range(3):
      x, y = w * (0.1 + 0.25 * k), h * (0.2 + 0.2 * k)
      box = [round(x, 1), round(y, 1), round(w * 0.2, 1), round(h * 0.3, 1)]
      anns.append({'id': len(anns) + 1, 'image_id': image_id, 'category_id': _category(image_id, k), 'bbox': box})
      anns[-1].update(area=box[2] * box[3], iscrowd=0)
  cats = [{'id': 10 + i, 'name': f'class{i}'} for i in range(1, NUM_CATEGORIES + 1)]
  path = os.path.join(root, 'boxes.json')
  with open(path, 'w') as f:
    json.dump({'images': images, 'annotations': anns, 'categories': cats}, f)
  return path, img


@pytest.fixture(scope='module')
def detection_only(tmp_path_factory):
  """A box-only COCO file with 5 categories, prepared with the CLI's NAME_SPLIT form into the default data dir."""
  root = str(tmp_path_factory.mktemp('det'))
  path, img = _write_detection_only(root)
  cwd = os.getcwd()
  os.chdir(root)
  try:
    prepare.main(['--format', 'coco', '--images', img, '--annotations', path, '--name', 'boxes_train'])
  finally:
    os.chdir(cwd)
  return os.path.join(root, 'data'), path


def test_detection_only_prepare(detection_only, capsys):
  data_dir, path = detection_only
  ds = PreparedDataset(data_dir, 'boxes', 'train')  # --name boxes_train = --name boxes --split train
  assert not ds.has_masks and ds.num_classes == NUM_CATEGORIES
  assert ds.label_map.category_ids == tuple(range(11, 11 + NUM_CATEGORIES))
  gt = ds.coco()
  with open(path) as f:
    src = json.load(f)
  assert len(gt.dataset['annotations']) == len(src['annotations'])
  assert all('segmentation' not in a for a in gt.dataset['annotations'])
  for a, b in zip(sorted(gt.dataset['annotations'], key=lambda a: a['id']), src['annotations']):
    assert a['bbox'] == b['bbox']
  from dimaskdino_jax.evaluation.evaluator import iou_types_for

  config = shapes_config(data_dir, name='boxes')
  assert iou_types_for(config, gt) == ('bbox',)  # evaluated on boxes only


def test_class_count_and_mask_losses_must_match_the_dataset(detection_only):
  data_dir, _ = detection_only
  config = shapes_config(data_dir, name='boxes')  # 3 classes, mask losses on
  with pytest.raises(DatasetError, match=f'num_classes = 3 but .* has {NUM_CATEGORIES} categories') as e:
    pipeline.make_train_iterator(config, verbose=False)
  assert f'--config.model.num_classes={NUM_CATEGORIES}' in str(e.value)
  with pytest.raises(DatasetError, match='num_classes = 3'):
    pipeline.EvalLoader(config, split='train')
  config.model.num_classes = NUM_CATEGORIES
  with pytest.raises(DatasetError, match='detection-only .*mask_losses is True.*mask_losses=False'):
    pipeline.make_train_iterator(config, verbose=False)
  config.loss.mask_losses = False
  pipeline.make_train_iterator(config, verbose=False)  # box_init is 'none' in the shapes config
  config.model.decoder.box_init = 'mask2box'
  with pytest.raises(DatasetError, match="box_init is 'mask2box'"):
    pipeline.make_train_iterator(config, verbose=False)


def test_detection_only_batches(detection_only, capsys):
  data_dir, path = detection_only
  config = shapes_config(data_dir, name='boxes', random_flip=False, max_instances=4)
  config.model.num_classes, config.loss.mask_losses = NUM_CATEGORIES, False
  config.train.batch_size = len(SIZES)
  batch = next(pipeline.make_train_iterator(config))
  out = capsys.readouterr().out
  assert f'{len(SIZES)} images, {len(SIZES)} used for training (boxes only' in out
  assert 'masks' not in batch and not batch['record_error'].any()
  assert batch['image'].shape == (len(SIZES), 128, 128, 3)
  with open(path) as f:
    src = json.load(f)
  s = config.data.image_size
  for i in range(len(SIZES)):
    # which image is in slot i: the resized image's extent inside the canvas tells it (pad value elsewhere)
    content = (batch['image'][i] != config.data.pad_value).any(axis=2)
    ys, xs = np.nonzero(content.any(axis=1))[0], np.nonzero(content.any(axis=0))[0]
    image_id = next(
      k
      for k, (h, w) in SIZES.items()
      if (round(h * s / max(h, w)), round(w * s / max(h, w))) == (ys[-1] + 1, xs[-1] + 1)
    )
    h, w = SIZES[image_id]
    nh, nw = round(h * s / max(h, w)), round(w * s / max(h, w))
    expected = []
    for a in src['annotations']:
      if a['image_id'] == image_id:
        x, y, bw, bh = a['bbox']
        expected.append([(x + bw / 2) * nw / w / s, (y + bh / 2) * nh / h / s, bw * nw / w / s, bh * nh / h / s])
    n = int(batch['valid'][i].sum())
    assert n == len(expected)
    np.testing.assert_allclose(batch['boxes'][i, :n], expected, atol=1e-5)
    np.testing.assert_array_equal(batch['labels'][i, :n], [_category(image_id, k) - 11 for k in range(3)])


def test_box_transform_follows_the_mask_transform():
  """LSJ on a rectangle: the box-only path gives the box of the transformed mask (within one source pixel)."""
  rng = np.random.default_rng(1)
  checked = 0
  for trial in range(20):
    h, w = rng.integers(20, 300, 2)
    x0, y0 = rng.integers(0, w - 5), rng.integers(0, h - 5)
    x1, y1 = rng.integers(x0 + 3, w + 1), rng.integers(y0 + 3, h + 1)
    mask = np.zeros((1, h, w), np.uint8)
    mask[0, y0:y1, x0:x1] = 1
    flip, new_hw, offset = transforms.lsj_geometry((h, w), rng, 128, 0.1, 2.0, True)
    cm = transforms.transform_masks(mask, flip, new_hw, offset, (128, 128))[0]
    box = transforms.transform_boxes([[x0, y0, x1, y1]], (h, w), flip, new_hw, offset, (128, 128))[0]
    if cm.area == 0:
      continue
    from_mask = transforms.masks_to_boxes(cm.mask[None])[0] + [cm.x0, cm.y0, cm.x0, cm.y0]
    np.testing.assert_allclose(box, from_mask, atol=1.01, err_msg=str(trial))  # nearest sampling: <= 1 px
    checked += 1
  assert checked >= 10


def test_split_name():
  assert prepare.split_name('coco2017_train', None) == ('coco2017', 'train')
  assert prepare.split_name('bdd100k_ins_seg_val', None) == ('bdd100k_ins_seg', 'val')
  assert prepare.split_name('coco2017', 'val2017') == ('coco2017', 'val2017')
  with pytest.raises(DatasetError, match='give --split'):
    prepare.split_name('coco2017', None)
