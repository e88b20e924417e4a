"""grain pipelines: the training batch contract, determinism, resume from state, workers, and evaluation batches."""

import numpy as np
import pytest

from dimaskdino_jax.data import pipeline, transforms
from dimaskdino_jax.data.tfds_builder import PreparedDataset

from .conftest import NUM_VAL, lsj_config, shapes_config


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _check_contract(batch, b, s, g, stride, num_classes):
  hm = s // stride
  expected = {
    'image': (np.uint8, (b, s, s, 3)),
    'boxes': (np.float32, (b, g, 4)),
    'labels': (np.int32, (b, g)),
    'valid': (np.bool_, (b, g)),
    'masks': (np.uint8, (b, g, hm, hm)),
    'num_dropped': (np.int32, (b,)),
    'record_error': (np.bool_, (b,)),
  }
  assert {k: (v.dtype, v.shape) for k, v in batch.items()} == {k: (np.dtype(t), sh) for k, (t, sh) in expected.items()}
  assert not batch['record_error'].any()
  valid = batch['valid']
  n = valid.sum(axis=1)
  np.testing.assert_array_equal(valid, np.arange(g)[None] < n[:, None])  # valid entries packed first
  assert (batch['labels'][valid] >= 0).all() and (batch['labels'][valid] < num_classes).all()
  assert (batch['labels'][~valid] == 0).all() and (batch['boxes'][~valid] == 0).all()
  assert (batch['masks'][~valid] == 0).all()
  boxes = batch['boxes'][valid]
  assert (boxes[:, 2:] > 0).all() and (boxes >= 0).all() and (boxes <= 1).all()
  # boxes are tight around the masks: at stride 1 exactly; at stride s the area-averaged mask (which can lose thin
  # parts) lies within the box grown by one cell
  xyxy = np.concatenate([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], axis=1) * s
  from_masks = transforms.masks_to_boxes(batch['masks'][valid].astype(bool)) * stride
  if stride == 1:
    np.testing.assert_allclose(from_masks, xyxy, atol=1e-4)
  else:
    nonempty = batch['masks'][valid].any(axis=(1, 2))
    assert nonempty.mean() > 0.8
    assert (from_masks[nonempty, :2] >= xyxy[nonempty, :2] - stride).all()
    assert (from_masks[nonempty, 2:] <= xyxy[nonempty, 2:] + stride).all()
  return n


def test_train_batches_resize_contract(data_dir):
  config = shapes_config(data_dir)
  it = pipeline.make_train_iterator(config)
  counts = []
  for batch in _take(it, 6):
    counts += _check_contract(batch, 4, 128, 8, 1, 3).tolist()
    assert batch['masks'].any(axis=(2, 3)).sum() == batch['valid'].sum()
  assert min(counts) >= 1  # filter_empty: every image has an instance (the resize transform loses none)
  assert max(counts) >= 3


def test_train_batches_lsj_contract_and_drops(data_dir):
  config = lsj_config(data_dir, max_instances=2, min_scale=0.5, max_scale=1.5)
  it = pipeline.make_train_iterator(config)
  dropped = 0
  for batch in _take(it, 6):
    _check_contract(batch, 4, 128, 2, 4, 3)
    dropped += batch['num_dropped'].sum()
    assert (batch['image'] == 128).all(axis=3).any()  # LSJ at scale < 1 leaves pad_value 128 at the bottom/right
  assert dropped > 0


def test_filter_empty(data_dir):
  prepared = PreparedDataset(data_dir, 'shapes', 'train')
  kept = pipeline.train_indices(prepared, True)
  assert 0 < len(kept) < len(prepared)
  assert (prepared.index['num_noncrowd'][kept] > 0).all()
  assert len(pipeline.train_indices(prepared, False)) == len(prepared)


def test_deterministic_per_seed(data_dir):
  config = lsj_config(data_dir)
  a = _take(pipeline.make_train_iterator(config, seed=7), 3)
  b = _take(pipeline.make_train_iterator(config, seed=7), 3)
  c = _take(pipeline.make_train_iterator(config, seed=8), 3)
  _assert_same(a, b)
  assert not all(np.array_equal(x['image'], y['image']) for x, y in zip(a, c))


def test_resume_from_state_and_epochs(data_dir):
  config = shapes_config(data_dir)
  it = pipeline.make_train_iterator(config)
  _take(it, 2)
  state = it.get_state()
  expected = _take(it, 12)  # 48 images: crosses the epoch boundary (< 40 non-empty images)
  resumed = pipeline.make_train_iterator(config)
  resumed.set_state(state)
  _assert_same(_take(resumed, 12), expected)


def test_shards_differ_and_workers_match(data_dir):
  config = shapes_config(data_dir)
  s0 = _take(pipeline.make_train_iterator(config, shard_index=0, shard_count=2), 2)
  s1 = _take(pipeline.make_train_iterator(config, shard_index=1, shard_count=2), 2)
  assert s0[0]['image'].shape[0] == 2  # global batch 4 over 2 processes
  assert not np.array_equal(s0[0]['image'], s1[0]['image'])
  # The processes' rows stacked in process order are the single-process global batch (multi-host = one host).
  single = _take(pipeline.make_train_iterator(config), 2)
  for k in range(2):
    for key in ('image', 'boxes', 'valid'):
      np.testing.assert_array_equal(np.concatenate([s0[k][key], s1[k][key]]), single[k][key])
  # Two worker processes: the same stream as in-process, and resumable.
  reference = _take(pipeline.make_train_iterator(config, num_workers=0), 4)
  it = pipeline.make_train_iterator(config, num_workers=2)
  try:
    _assert_same(_take(it, 2), reference[:2])
    state = it.get_state()
  finally:
    it.close()
  it = pipeline.make_train_iterator(config, num_workers=2)
  try:
    it.set_state(state)
    _assert_same(_take(it, 2), reference[2:])
  finally:
    it.close()


def test_eval_batches_shapes_config(data_dir):
  config = shapes_config(data_dir)
  loader = pipeline.EvalLoader(config)
  prepared = loader.prepared
  assert loader.canvases == [(128, 128)] and len(loader) == -(-NUM_VAL // 4)
  batches = list(loader)
  assert len(batches) == len(loader)
  ids, pads = [], 0
  for batch in batches:
    assert batch['image'].shape == (4, 128, 128, 3) and batch['image'].dtype == np.uint8
    assert batch['image_id'].dtype == np.int64 and batch['image_hw'].dtype == np.int32
    assert batch['orig_hw'].shape == (4, 2) and batch['is_padding'].dtype == np.bool_
    for k in range(4):
      if batch['is_padding'][k]:
        pads += 1
        continue
      i = int(np.nonzero(prepared.index['image_id'] == batch['image_id'][k])[0][0])
      h, w = int(prepared.index['height'][i]), int(prepared.index['width'][i])
      assert batch['orig_hw'][k].tolist() == [h, w]
      assert batch['image_hw'][k].tolist() == list(transforms.shortest_edge_hw(h, w, 128, 128))
      ih, iw = batch['image_hw'][k]
      assert max(ih, iw) == 128
      pad = np.round(np.asarray(config.model.pixel_mean)).astype(np.uint8)
      assert (batch['image'][k, ih:] == pad).all() and (batch['image'][k, :, iw:] == pad).all()
      ids.append(int(batch['image_id'][k]))
  assert ids == prepared.index['image_id'].tolist() == loader.image_ids.tolist()
  assert pads == len(loader) * 4 - NUM_VAL
  assert batches[-1]['is_padding'][-pads:].all()
  gt = prepared.coco()
  assert sorted(gt.getImgIds()) == sorted(ids)
  assert prepared.label_to_category_id.tolist() == [1, 3, 7]


@pytest.mark.parametrize('mode', ['buckets', 'exact'])
def test_eval_canvas_choice(data_dir, mode):
  config = lsj_config(data_dir)  # test resize: short side 64, long <= 128
  loader = pipeline.EvalLoader(config, mode=mode, shard_count=1)
  prepared = loader.prepared
  seen = set()
  total = 0
  for batch, canvas in zip(loader, loader.batch_canvases):
    assert batch['image'].shape == (3, *canvas, 3)
    for k in np.nonzero(~batch['is_padding'])[0]:
      i = int(np.nonzero(prepared.index['image_id'] == batch['image_id'][k])[0][0])
      hw = transforms.shortest_edge_hw(int(prepared.index['height'][i]), int(prepared.index['width'][i]), 64, 128)
      assert tuple(batch['image_hw'][k]) == hw
      if mode == 'buckets':
        assert canvas == transforms.choose_canvas(hw, config.data.eval_canvases)
      else:
        assert canvas == (-(-hw[0] // 32) * 32, -(-hw[1] // 32) * 32)
      seen.add(canvas)
      total += 1
  assert total == NUM_VAL == loader.num_images
  assert len(seen) >= 2  # portrait, landscape and square test images use different canvases
  # batches are grouped by canvas: each canvas occupies one contiguous run of batches
  runs = [c for i, c in enumerate(loader.batch_canvases) if i == 0 or c != loader.batch_canvases[i - 1]]
  assert len(runs) == len(set(runs))


def test_eval_shards(data_dir):
  config = lsj_config(data_dir)
  shards = [pipeline.EvalLoader(config, shard_index=i, shard_count=2, batch_size=2) for i in range(2)]
  assert shards[0].batch_canvases == shards[1].batch_canvases  # same batch shapes on every process
  ids = np.concatenate([s.image_ids for s in shards])
  assert sorted(ids.tolist()) == shards[0].prepared.index['image_id'].tolist()
  limited = pipeline.EvalLoader(config, max_images=5)
  assert limited.num_images == 5
