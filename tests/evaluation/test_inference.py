"""predict.py / evaluation.inference on a tiny random model: results equal the evaluation path, image modes, bad
files, the drawings and the COCO-format JSON. The model compiles with a low XLA optimization level (FAST)."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pycocotools.mask as mask_util
import pytest
from PIL import Image

from dimaskdino_jax.data.pipeline import EvalLoader
from dimaskdino_jax.data.transforms import decode_image
from dimaskdino_jax.evaluation import evaluator, inference
from dimaskdino_jax.evaluation.postprocess import postprocess_batch
from dimaskdino_jax.modeling.model import build_model
from dimaskdino_jax.training.checkpoint import Checkpointer
from tests.evaluation.test_evaluator import FAST, TINY_OVERRIDES, tiny_config
from tests.tiny import init_variables, prepared_shapes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return prepared_shapes(tmp_path_factory, num_train=4, num_val=4)


@pytest.fixture(scope='module')
def variables():
  return init_variables('evaluator_tiny', lambda: tiny_config('unused'))  # shared with tests/test_export.py


def _close(a, b):
  np.testing.assert_allclose(a['scores'], b['scores'], rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(a['labels'], b['labels'])
  np.testing.assert_allclose(a['boxes'], b['boxes'], rtol=1e-4, atol=1e-3)
  assert np.mean(a['masks'] != b['masks']) < 1e-3


def test_predictor_matches_evaluation_and_handles_modes(data_dir, variables, tmp_path):
  config = tiny_config(data_dir)
  config.eval.batch_size = 2
  predictor = inference.Predictor(config, variables, compiler_options=FAST)

  # The evaluation path (EvalLoader's transform -> the same predict function -> postprocess) on val images.
  loader = EvalLoader(config, max_images=2)
  batch = next(iter(loader))
  (topk,) = evaluator.make_predict_fn(build_model(config), 100, True, False, tuple(sorted(FAST.items())))(
    variables, jnp.asarray(batch['image']), jnp.asarray(batch['image_hw'])
  )
  expected = postprocess_batch(topk, batch['image_hw'], (64, 64), batch['orig_hw'], ~batch['is_padding'])
  record_of = {int(i): r for r, i in enumerate(loader.prepared.index['image_id'])}
  originals = [decode_image(loader.prepared.data_source[record_of[int(i)]]['image']) for i in batch['image_id']]

  # Files in several modes: RGB PNG, grayscale, RGBA; plus a missing and a corrupt file.
  paths = []
  for name, im in (('rgb.png', Image.fromarray(originals[0])), ('second.png', Image.fromarray(originals[1]))):
    im.save(tmp_path / name)
    paths.append(str(tmp_path / name))
  gray = Image.fromarray(originals[0]).convert('L')
  gray.save(tmp_path / 'gray.png')
  rgba = Image.fromarray(originals[1]).convert('RGBA')
  rgba.putalpha(77)
  rgba.save(tmp_path / 'rgba.png')
  (tmp_path / 'corrupt.jpg').write_bytes(b'not an image at all')
  paths += [str(tmp_path / 'gray.png'), str(tmp_path / 'rgba.png'), str(tmp_path / 'missing.jpg')]
  paths.append(str(tmp_path / 'corrupt.jpg'))

  got = {}
  out = tmp_path / 'out'
  evaluator.PREDICT_TRACES.clear()
  report = inference.predict_files(
    predictor,
    paths,
    str(out),
    score_threshold=0.0,
    verbose=False,
    on_result=lambda p, r: got.__setitem__(os.path.basename(p), r),
  )
  assert sum(evaluator.PREDICT_TRACES.values()) <= 1  # one canvas, compiled at most once (cached across tests)
  _close(got['rgb.png'], expected[0])
  _close(got['second.png'], expected[1])
  gray_rgb = np.repeat(np.asarray(gray)[..., None], 3, axis=2)
  _close(got['gray.png'], predictor([gray_rgb])[0])
  _close(got['rgba.png'], got['second.png'])  # alpha dropped: the same pixels as the RGB file
  assert [s['file'] for s in report['skipped']] == sorted([paths[-2], paths[-1]])
  assert 'no such file' in report['skipped'][1]['reason'] and 'not a readable image' in report['skipped'][0]['reason']

  # Drawings at the original size; the JSON in COCO result format with RLE masks equal to the results.
  assert Image.open(out / 'rgb.png').size == Image.open(paths[0]).size
  assert Image.open(out / 'gray.png').mode == 'RGB'
  dets = json.load(open(out / 'detections.json'))
  images = json.load(open(out / 'images.json'))
  assert [e['file_name'] for e in images['images']] == paths[:4]
  assert [c['name'] for c in images['categories']] == ['circle', 'square', 'triangle']
  first = [d for d in dets if d['image_id'] == 1]
  assert len(first) == len(got['rgb.png']['scores']) == report['images'][0]['num_detections']
  order = np.argsort(-got['rgb.png']['scores'], kind='stable')
  for d, j in zip(first, order):
    assert set(d) >= {'image_id', 'category_id', 'bbox', 'score', 'segmentation', 'file_name', 'category_name'}
    assert d['score'] == pytest.approx(float(got['rgb.png']['scores'][j]), rel=1e-6)
    x0, y0, x1, y1 = got['rgb.png']['boxes'][j]
    np.testing.assert_allclose(d['bbox'], [x0, y0, x1 - x0, y1 - y0], rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(mask_util.decode(d['segmentation']).astype(bool), got['rgb.png']['masks'][j])

  # A threshold keeps only the detections at or above it.
  thr = float(np.median(got['rgb.png']['scores']))
  report = inference.predict_files(predictor, paths[:1], str(tmp_path / 'thr'), score_threshold=thr, verbose=False)
  kept = json.load(open(tmp_path / 'thr' / 'detections.json'))
  assert len(kept) == int(np.sum(got['rgb.png']['scores'] >= thr)) and all(d['score'] >= thr for d in kept)


def test_canvas_choice(data_dir, variables):
  config = tiny_config(data_dir, eval_canvases=((64, 64), (64, 96)), test_max_size=160)
  p = inference.Predictor(config, variables)
  assert p.canvas_for((64, 64)) == (64, 64)
  assert p.canvas_for((60, 90)) == (64, 96)  # resized to 64 x 96: the wider bucket
  assert p.canvas_for((40, 100)) == (64, 160)  # 64 x 160 fits no bucket: its own canvas, padded to 32


def _load_cli():
  spec = importlib.util.spec_from_file_location('predict_cli', os.path.join(REPO, 'predict.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_predict_cli(data_dir, variables, tmp_path, monkeypatch):
  workdir = tmp_path / 'run'
  state = {
    'params': variables['params'],
    'frozen_bn': variables['frozen_bn'],
    'opt_state': {'count': jnp.zeros((), jnp.int32)},
    'step': jnp.asarray(3, jnp.int32),
    'rng': jax.random.key(1),
  }
  with Checkpointer(str(workdir), tiny_config(data_dir), async_save=False) as ckpt:
    assert ckpt.save(3, state)
  image = tmp_path / 'a.jpg'
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(image)
  args = ['--config', os.path.join(REPO, 'configs', 'shapes.py'), f'--config.data.data_dir={data_dir}']
  args += [f'--config.{k}={v}' for k, v in TINY_OVERRIDES.items()]
  cli = _load_cli()
  real = inference.Predictor
  monkeypatch.setattr(
    inference, 'Predictor', lambda config, variables, **kw: real(config, variables, **kw, **{'compiler_options': FAST})
  )
  out = tmp_path / 'pred'
  report = cli.main(
    args
    + ['--workdir', str(workdir), '--images', str(image), 'nope.png', '--out', str(out), '--batch-size', '2', '--quiet']
  )
  assert len(report['images']) == 1 and len(report['skipped']) == 1 and (out / 'a.png').is_file()
  assert Image.open(out / 'a.png').size == (70, 50)
  with pytest.raises(SystemExit, match='none of the 1 images'):
    cli.main(
      args + ['--workdir', str(workdir), '--images', 'nope.png', '--out', str(out), '--batch-size', '2', '--quiet']
    )
