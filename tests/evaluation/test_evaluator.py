"""evaluate() end to end on a tiny model and a generated shapes split; a ground-truth oracle; eval.py; drawing.

The model compiles with a low XLA optimization level (`FAST`): the same computation, a few times faster to build on
2 CPU cores. Random weights give AP near 0, so the numbers are checked with an oracle that predicts the ground truth
through the same loader / post-processing / COCO path (bbox AP must be 100).
"""

import importlib.util
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dimaskdino_jax.config import load_config, validate
from dimaskdino_jax.data.pipeline import EvalLoader
from dimaskdino_jax.evaluation import evaluator
from dimaskdino_jax.evaluation.coco_eval import METRIC_NAMES
from dimaskdino_jax.evaluation.postprocess import TopK
from dimaskdino_jax.evaluation.visualize import draw_predictions, save_prediction_grid
from dimaskdino_jax.modeling.model import build_model
from dimaskdino_jax.training import checkpoint as ckpt_lib
from dimaskdino_jax.training.checkpoint import Checkpointer
from tests.tiny import FAST, prepared_shapes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_VAL = 6
# Val images of write_shapes_dataset(seed 0, image_size 64): ids 1..6, (h, w) = (64, 73) (54, 53) (55, 75) (68, 51)
# (62, 62) (49, 62). With test sizes (64, 96) they go to canvases (64, 96) x4 and (96, 64) x2.
TWO_CANVASES = dict(eval_canvases=((64, 96), (96, 64)), test_max_size=96)

TINY_OVERRIDES = {
  'model.hidden_dim': '32',
  'model.encoder.num_groups': '16',
  'model.encoder.ffn_dim': '64',
  'model.decoder.ffn_dim': '64',
  'model.di.selection_ks': '(24, 12)',
  'model.decoder.num_queries': '12',
  'model.bato.num_guiding_tokens': '4',
  'data.image_size': '64',
  'data.eval_canvases': '((64, 64),)',
  'data.test_short_edge': '64',
  'data.test_max_size': '64',
  'model.backbone.norm': 'FrozenBN',  # the R50 layout: exercises restoring the frozen_bn collection
}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return prepared_shapes(tmp_path_factory, num_train=8, num_val=NUM_VAL)


def tiny_config(data_dir, **data):
  c = load_config(os.path.join(REPO, 'configs', 'shapes.py'))
  m = c.model
  m.hidden_dim, m.encoder.num_groups, m.encoder.ffn_dim, m.decoder.ffn_dim = 32, 16, 64, 64
  m.di.selection_ks, m.decoder.num_queries, m.bato.num_guiding_tokens = (24, 12), 12, 4
  m.backbone.norm = 'FrozenBN'  # the R50 layout (the shapes config trains a GN backbone from scratch)
  d = c.data
  d.data_dir, d.image_size, d.eval_canvases, d.test_short_edge, d.test_max_size = data_dir, 64, ((64, 64),), 64, 64
  c.eval.batch_size = 4
  for key, value in data.items():
    d[key] = value
  validate(c)
  return c


@pytest.fixture(scope='module')
def variables(data_dir):
  model = build_model(tiny_config(data_dir))
  images = jnp.zeros((1, 64, 64, 3), jnp.uint8)
  init = jax.jit(model.init).lower(jax.random.key(0), images).compile(compiler_options=FAST)
  return init(jax.random.key(0), images)


def _fresh_traces():
  evaluator.make_predict_fn.cache_clear()
  evaluator.PREDICT_TRACES.clear()


def _load_metrics(path):
  with open(path) as f:
    return json.load(f)


def _same(a, b):
  return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-9)


def test_evaluate_end_to_end_one_compile_per_canvas(data_dir, variables, tmp_path):
  config = tiny_config(data_dir, **TWO_CANVASES)
  config.eval.batch_size = 2  # (64, 96): 2 batches, (96, 64): 1 batch
  loader = EvalLoader(config)
  assert loader.canvases == [(64, 96), (96, 64)] and len(loader) == 3
  _fresh_traces()
  out = tmp_path / 'eval'
  metrics = evaluator.evaluate(
    config, variables, out_dir=str(out), verbose=False, num_visualize=2, compiler_options=FAST
  )
  assert dict(evaluator.PREDICT_TRACES) == {(64, 96): 1, (96, 64): 1}  # 3 batches, 2 compilations

  saved = _load_metrics(out / 'metrics.json')
  assert set(saved) == {'bbox', 'segm', 'images'} == set(metrics)
  assert saved['images'] == {'evaluated': loader.num_images, 'undecodable': 0}
  for t in ('bbox', 'segm'):
    assert set(saved[t]) == set(METRIC_NAMES)
    for name in METRIC_NAMES:
      v = saved[t][name]
      assert isinstance(v, float) and (math.isnan(v) or 0.0 <= v <= 100.0)
      assert _same(v, metrics[t][name])
    assert not math.isnan(saved[t]['AP'])  # every image has GT boxes of some size
  evaluator.check_metrics(saved)

  grid = Image.open(out / 'predictions.png')
  # The first two images in loader order (ids 1 and 3: 64x73 and 55x75), enlarged 4x and 5x (to >= 256 rows),
  # side by side at the taller height.
  assert grid.size == (round(4 * 73 * 275 / 256) + 4 + 5 * 75, 275)

  # A second evaluate of the same model reuses the compiled predict function.
  evaluator.evaluate(config, variables, verbose=False, max_images=1, compiler_options=FAST)
  assert dict(evaluator.PREDICT_TRACES) == {(64, 96): 1, (96, 64): 1}


def test_evaluate_per_layer(data_dir, variables, tmp_path):
  config = tiny_config(data_dir)
  _fresh_traces()
  metrics = evaluator.evaluate(
    config, variables, per_layer=True, max_images=4, out_dir=str(tmp_path), verbose=False, compiler_options=FAST
  )
  assert dict(evaluator.PREDICT_TRACES) == {(64, 64): 1}
  num_layers = config.model.decoder.num_layers
  saved = _load_metrics(tmp_path / 'metrics.json')
  assert set(saved) == {'bbox', 'segm', 'per_layer', 'images'}
  assert saved['images'] == {'evaluated': 4, 'undecodable': 0}
  layers = saved['per_layer']
  assert len(layers) == num_layers + 1 == len(metrics['per_layer'])
  assert [e['layer'] for e in layers] == ['initial'] + [f'decoder_{i}' for i in range(num_layers)]
  evaluator.check_metrics(saved)
  for t in ('bbox', 'segm'):  # the last entry is the model's output
    assert all(_same(layers[-1][t][n], saved[t][n]) for n in METRIC_NAMES)

  # The per-layer predict function: one TopK per entry, all with masks, the last equal to the plain predict's.
  model, k = build_model(config), config.eval.detections_per_image
  fast = tuple(sorted(FAST.items()))
  batch = next(iter(EvalLoader(config, max_images=4)))
  args = (variables, jnp.asarray(batch['image']), jnp.asarray(batch['image_hw']))
  every = evaluator.make_predict_fn(model, k, True, True, fast)(*args)
  (final,) = evaluator.make_predict_fn(model, k, True, False, fast)(*args)
  assert len(every) == num_layers + 1 and all(e.mask_logits.shape == final.mask_logits.shape for e in every)
  np.testing.assert_array_equal(every[-1].labels, final.labels)
  np.testing.assert_array_equal(every[-1].queries, final.queries)
  for a, b in ((every[-1].scores, final.scores), (every[-1].boxes, final.boxes)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(every[-1].mask_logits, final.mask_logits, rtol=1e-4, atol=1e-4)
  assert not np.allclose(every[0].boxes, final.boxes)  # the initial prediction is another entry


def _oracle_predict_factory(config, gt, num_entries=1):
  """A stand-in for make_predict_fn whose 'predictions' are the ground truth of each batch's images (by loader
  order), as canvas-normalized cxcywh boxes and full-canvas mask logits (+-8), plus zero-score fillers.

  With num_entries > 1 (per-layer), every entry but the last has its boxes moved off the objects and empty masks.
  """
  loader = EvalLoader(config)
  batches = iter(list(loader))  # the same deterministic order evaluate() will see
  k = 1 + max(len(gt.getAnnIds(imgIds=[i], iscrowd=False)) for i in gt.getImgIds())

  def predict(variables, images, image_hw):
    batch = next(batches)
    b, hc, wc = images.shape[:3]
    scores = np.zeros((b, k), np.float32)
    labels = np.zeros((b, k), np.int32)
    boxes = np.tile(np.asarray([0.5, 0.5, 0.1, 0.1], np.float32), (b, k, 1))
    masks = np.full((b, k, hc, wc), -8.0, np.float32)
    cat_to_label = {c: i for i, c in enumerate(sorted(gt.getCatIds()))}
    for i in range(b):
      if batch['is_padding'][i]:
        continue
      ih, iw = (int(v) for v in batch['image_hw'][i])
      oh, ow = (int(v) for v in batch['orig_hw'][i])
      anns = gt.loadAnns(gt.getAnnIds(imgIds=[int(batch['image_id'][i])], iscrowd=False))
      for j, a in enumerate(anns):
        x, y, w, h = a['bbox']
        sx, sy = iw / ow / wc, ih / oh / hc  # original pixels -> canvas-normalized
        boxes[i, j] = [(x + w / 2) * sx, (y + h / 2) * sy, w * sx, h * sy]
        labels[i, j] = cat_to_label[a['category_id']]
        scores[i, j] = 0.9
        m = np.asarray(Image.fromarray(gt.annToMask(a) * 255).resize((iw, ih), Image.BILINEAR)) >= 128
        masks[i, j, :ih, :iw] = np.where(m, 8.0, -8.0)
    queries = np.zeros((b, k), np.int32)
    wrong_boxes = boxes + np.asarray([2.0, 0.0, 0.0, 0.0], np.float32) * boxes[..., 2:3]  # cx moved by 2 widths
    wrong = TopK(scores, labels, queries, wrong_boxes, np.full_like(masks, -8.0))
    return (wrong,) * (num_entries - 1) + (TopK(scores, labels, queries, boxes, masks),)

  return lambda *args, **kwargs: predict


def _record_added_images(monkeypatch):
  """Makes evaluate() record the image ids its COCOEvaluator receives; returns that (growing) list."""
  added = []

  class Recording(evaluator.COCOEvaluator):
    def add(self, image_id, result):
      added.append(image_id)
      super().add(image_id, result)

  monkeypatch.setattr(evaluator, 'COCOEvaluator', Recording)
  return added


def test_oracle_predictions_give_full_ap(data_dir, monkeypatch):
  config = tiny_config(data_dir, **TWO_CANVASES)
  gt = EvalLoader(config).prepared.coco()
  monkeypatch.setattr(evaluator, 'make_predict_fn', _oracle_predict_factory(config, gt))
  added = _record_added_images(monkeypatch)
  metrics = evaluator.evaluate(config, {'params': {}}, verbose=False)
  assert sorted(added) == sorted(gt.getImgIds()) == list(range(1, NUM_VAL + 1))  # every image once, no fillers
  assert metrics['bbox']['AP'] == pytest.approx(100.0, abs=1e-6)
  assert metrics['bbox']['AP50'] == pytest.approx(100.0, abs=1e-6)
  # Masks go through a resize to the test size and back: close to, not exactly, the ground truth.
  assert metrics['segm']['AP50'] == pytest.approx(100.0, abs=1e-6)
  assert 90.0 < metrics['segm']['AP'] <= 100.0


def test_oracle_per_layer_entries_in_order(data_dir, monkeypatch):
  config = tiny_config(data_dir)
  n = config.model.decoder.num_layers + 1
  gt = EvalLoader(config).prepared.coco()
  monkeypatch.setattr(evaluator, 'make_predict_fn', _oracle_predict_factory(config, gt, num_entries=n))
  metrics = evaluator.evaluate(config, {'params': {}}, per_layer=True, verbose=False)
  layers = metrics['per_layer']
  assert [e['layer'] for e in layers] == ['initial'] + [f'decoder_{i}' for i in range(n - 1)]
  for e in layers[:-1]:  # boxes shifted by two widths (no overlap) and empty masks
    assert e['bbox']['AP'] == 0.0 and e['segm']['AP'] == 0.0
  assert layers[-1]['bbox']['AP'] == pytest.approx(100.0, abs=1e-6) == metrics['bbox']['AP']
  assert layers[-1]['segm']['AP'] == metrics['segm']['AP'] > 80.0


def test_iou_types(data_dir):
  config = tiny_config(data_dir)
  gt = EvalLoader(config).prepared.coco()
  assert evaluator.iou_types_for(config, gt) == ('bbox', 'segm')
  config.loss.mask_losses = False
  assert evaluator.iou_types_for(config, gt) == ('bbox',)


def _load_eval_cli():
  spec = importlib.util.spec_from_file_location('eval_cli', os.path.join(REPO, 'eval.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _cli_args(data_dir, *extra):
  args = ['--config', os.path.join(REPO, 'configs', 'shapes.py'), f'--config.data.data_dir={data_dir}']
  for key, value in TINY_OVERRIDES.items():
    args.append(f'--config.{key}={value}')
  return args + list(extra)


def test_eval_cli_restores_checkpoint_and_overrides(data_dir, variables, tmp_path, monkeypatch, capsys):
  cli = _load_eval_cli()
  workdir = tmp_path / 'run'
  # The checkpoint layout of the trainer: {'params', 'frozen_bn', 'opt_state', 'step', 'rng'}.
  state = {
    'params': variables['params'],
    'frozen_bn': variables['frozen_bn'],
    'opt_state': {'count': jnp.zeros((), jnp.int32), 'mu': jax.tree.map(jnp.zeros_like, variables['params'])},
    'step': jnp.asarray(7, jnp.int32),
    'rng': jax.random.key(1),
  }
  with Checkpointer(str(workdir), tiny_config(data_dir), async_save=False) as ckpt:
    assert ckpt.save(7, state)

  calls = []
  monkeypatch.setattr(evaluator, 'evaluate', lambda config, variables, **kw: calls.append((config, variables, kw)))
  cli.main(_cli_args(data_dir, '--workdir', str(workdir), '--per-layer', '--max-images', '3', '--quiet'))
  config, restored, kw = calls[-1]
  assert config.model.hidden_dim == 32 and config.model.di.selection_ks == (24, 12)
  assert tuple(map(tuple, config.data.eval_canvases)) == ((64, 64),) and config.data.data_dir == data_dir
  assert kw['out_dir'] == os.path.join(str(workdir), 'eval')
  assert kw['per_layer'] is True and kw['max_images'] == 3 and kw['mode'] == 'buckets' and kw['split'] is None
  assert set(restored) == {'params', 'frozen_bn'}  # the optimizer state is not restored
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(variables), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # --checkpoint STEP_DIR, exact mode, a split: the workdir's eval/ is still the default output.
  cli.main(_cli_args(data_dir, '--checkpoint', str(workdir / 'checkpoints' / '7'), '--mode', 'exact', '--quiet'))
  assert calls[-1][2]['out_dir'] == os.path.join(str(workdir), 'eval') and calls[-1][2]['mode'] == 'exact'

  # A config that does not match the checkpoint: a clear error naming the checkpoint.
  with pytest.raises(SystemExit, match='does not match the model'):
    cli.main(_cli_args(data_dir, '--workdir', str(workdir), '--config.model.decoder.num_layers=2', '--quiet'))

  # No checkpoint: the error names the directory searched.
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(SystemExit, match=str(empty / 'checkpoints')):
    cli.main(_cli_args(data_dir, '--workdir', str(empty), '--quiet'))

  # Bad overrides are usage errors (argparse exits with status 2).
  for bad in ('--config.model.no_such_field=1', '--config.model.hidden_dim=abc', '--config.model.hidden_dim=30'):
    with pytest.raises(SystemExit) as e:
      cli.main(_cli_args(data_dir, '--workdir', str(workdir), bad))
    assert e.value.code == 2
  err = capsys.readouterr().err
  assert 'no_such_field' in err and 'model.hidden_dim' in err
  assert len(calls) == 2


def test_resolve_checkpoint(tmp_path):
  ckpts = tmp_path / 'checkpoints'
  for name in ('100', '2000', '30000.orbax-checkpoint-tmp-1'):
    (ckpts / name / 'state').mkdir(parents=True)
  (ckpts / '50000').mkdir()  # no state item: incomplete
  latest = str(ckpts / '2000')
  assert ckpt_lib.resolve_checkpoint(workdir=str(tmp_path)) == (latest, 2000)
  assert ckpt_lib.resolve_checkpoint(checkpoint=str(tmp_path)) == (latest, 2000)
  assert ckpt_lib.resolve_checkpoint(checkpoint=str(ckpts)) == (latest, 2000)
  assert ckpt_lib.resolve_checkpoint(checkpoint=str(ckpts / '100')) == (str(ckpts / '100'), 100)
  with pytest.raises(FileNotFoundError, match='no such directory'):
    ckpt_lib.resolve_checkpoint(workdir=str(tmp_path / 'missing'))


def _result(h, w):
  masks = np.zeros((3, h, w), bool)
  masks[0, 10:30, 5:25] = True  # kept (score 0.9)
  masks[1, 35:45, 30:38] = True  # below the threshold: not drawn
  return {
    'scores': np.asarray([0.9, 0.1, 0.5], np.float32),
    'labels': np.asarray([0, 1, 7]),  # label 7 has no name: drawn as '7'
    'boxes': np.asarray([[5, 10, 25, 30], [30, 35, 38, 45], [1, 1, 60, 48]], np.float32),
    'masks': masks,
  }


def test_draw_predictions_and_grid(tmp_path):
  h, w = 50, 64
  image = np.full((h, w, 3), 100, np.uint8)
  result = _result(h, w)
  out = draw_predictions(image, result, ['circle', 'square'], score_threshold=0.3)
  assert isinstance(out, Image.Image) and out.size == (w, h) and out.mode == 'RGB'
  arr = np.asarray(out)
  inner = arr[20:28, 8:22]  # inside mask 0, away from its outline and text
  assert np.all(np.any(inner != 100, axis=-1))
  assert np.all(inner == inner[0, 0])  # one translucent colour: 100 * 0.55 + colour * 0.45
  np.testing.assert_array_equal(arr[38:43, 32:36], image[38:43, 32:36])  # the 0.1 detection is not drawn
  assert np.any(arr[1, 1:60] != 100)  # the box of the 0.5 detection is drawn
  np.testing.assert_array_equal(np.asarray(draw_predictions(image, result, score_threshold=0.95)), image)

  with pytest.raises(ValueError, match='image size'):
    draw_predictions(np.zeros((20, 20, 3), np.uint8), result)

  path = tmp_path / 'sub' / 'grid.png'
  results = [result, {**_result(h, w), 'masks': None}]
  grid = save_prediction_grid(str(path), [image, image[:25]], results, ['circle', 'square'], gap=4, min_draw_height=0)
  saved = Image.open(path)
  assert saved.size == grid.size == (w + 4 + 2 * w, h)  # the 25-row image is scaled to the 50-row height
  np.testing.assert_array_equal(np.asarray(saved)[:, :w], arr)  # the first panel is draw_predictions' image
  # Small images are enlarged by an integer factor before drawing: 50 rows x6 = 300, 25 rows x11 = 275.
  grid = save_prediction_grid(str(path), [image, image[:25]], results, gap=4, titles=['a', 'b'])
  assert grid.size == (6 * w + 4 + round(11 * w * 300 / 275), 300)
  big = np.asarray(grid)[:, : 6 * w]
  assert np.all(big[6 * 20 : 6 * 28, 6 * 8 : 6 * 22] == inner[0, 0])  # the mask, enlarged


def test_merge_process_results_checks_every_image_once():
  # Process shares as gather_to_process0 returns them: shares[p][j] = process p's images and results of evaluator j.
  def share(ids):
    return {'img_ids': ids, 'results': {'bbox': [{'image_id': i, 'score': 0.5} for i in ids]}}

  shares = [[share([1, 3, 5])], [share([2, 4])]]
  (merged,) = evaluator.merge_process_results(shares, [5, 4, 3, 2, 1])
  assert sorted(merged['img_ids']) == [1, 2, 3, 4, 5]
  assert sorted(d['image_id'] for d in merged['results']['bbox']) == [1, 2, 3, 4, 5]
  with pytest.raises(ValueError, match='image 3 was evaluated by processes 0 and 1'):
    evaluator.merge_process_results([[share([1, 3, 5])], [share([2, 3, 4])]], [1, 2, 3, 4, 5])
  with pytest.raises(ValueError, match=r'missing \[4\]'):
    evaluator.merge_process_results([[share([1, 3, 5])], [share([2])]], [1, 2, 3, 4, 5])
  stray = share([2, 4])
  stray['results']['bbox'].append({'image_id': 1, 'score': 0.1})
  with pytest.raises(ValueError, match='did not evaluate'):
    evaluator.merge_process_results([[share([1, 3, 5])], [stray]], [1, 2, 3, 4, 5])
  # An undecodable image (left out of COCO eval, counted) covers its id too.
  (merged,) = evaluator.merge_process_results([[share([1, 3, 5])], [dict(share([2]), undecodable=[4])]], range(1, 6))
  assert sorted(merged['img_ids']) == [1, 2, 3, 5] and merged['undecodable'] == [4]
  with pytest.raises(ValueError, match='image 4 was evaluated by processes 0 and 1'):
    evaluator.merge_process_results([[share([1, 3, 4, 5])], [dict(share([2]), undecodable=[4])]], range(1, 6))
  with pytest.raises(ValueError, match='different numbers'):
    evaluator.merge_process_results([[share([1])], [share([2]), share([2])]], [1, 2])


def test_local_copy_of_variables_keeps_local_arrays():
  x = jnp.arange(3.0)
  tree = {'a': x, 'b': np.ones(2)}
  out = evaluator._local_copy(tree)
  assert out['a'] is x and out['b'] is tree['b']  # one process: every array is fully addressable


def test_undecodable_val_images_are_counted_not_evaluated(data_dir, monkeypatch, capsys):
  """The loader turns an undecodable val record into a flagged filler (tests/data/test_bad_records.py); the
  evaluator leaves it out of the COCO evaluation and reports it in the summary and metrics['images']."""
  config = tiny_config(data_dir)
  gt = EvalLoader(config).prepared.coco()
  monkeypatch.setattr(evaluator, 'make_predict_fn', _oracle_predict_factory(config, gt))
  plain_iter = EvalLoader.__iter__
  flagged = []

  def iter_with_one_bad_record(self):
    for batch in plain_iter(self):
      if not flagged:  # the first real image of the first batch becomes what an undecodable record gives
        batch = dict(batch, record_error=batch['record_error'].copy(), is_padding=batch['is_padding'].copy())
        i = int(np.flatnonzero(~batch['is_padding'])[0])
        batch['record_error'][i], batch['is_padding'][i] = True, True
        flagged.append(int(batch['image_id'][i]))
      yield batch

  monkeypatch.setattr(EvalLoader, '__iter__', iter_with_one_bad_record)
  added = _record_added_images(monkeypatch)
  metrics = evaluator.evaluate(config, {'params': {}}, verbose=False)
  assert metrics['images'] == {'evaluated': NUM_VAL - 1, 'undecodable': 1}
  assert sorted(added) == sorted(set(gt.getImgIds()) - set(flagged))
  assert metrics['bbox']['AP'] == pytest.approx(100.0, abs=1e-6)  # the GT of the left-out image is not counted
  assert f'ids {flagged}' in capsys.readouterr().out
