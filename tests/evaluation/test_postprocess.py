"""Post-processing (docs/architecture.md, "Inference post-processing"): top-k, mask upsampling / scores, box scaling."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimaskdino_jax.evaluation.postprocess import (
  bilinear_matrix,
  postprocess_batch,
  postprocess_image,
  select_topk,
  select_topk_from_predictions,
  upsample_masks,
)
from dimaskdino_jax.modeling.outputs import HeadOutputs, Predictions, zeros_like_head


def _sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


def torch_bilinear_ref(x, out_hw):
  """float64 torch F.interpolate(mode='bilinear', align_corners=False) of a 2-d map, pixel by pixel."""
  h, w = x.shape
  oh, ow = out_hw
  out = np.zeros((oh, ow), np.float64)
  for i in range(oh):
    sy = max((i + 0.5) * h / oh - 0.5, 0.0)
    y0 = int(math.floor(sy))
    y1 = y0 + 1 if y0 < h - 1 else y0
    ly = sy - y0
    for j in range(ow):
      sx = max((j + 0.5) * w / ow - 0.5, 0.0)
      x0 = int(math.floor(sx))
      x1 = x0 + 1 if x0 < w - 1 else x0
      lx = sx - x0
      out[i, j] = (1 - ly) * ((1 - lx) * x[y0, x0] + lx * x[y0, x1]) + ly * ((1 - lx) * x[y1, x0] + lx * x[y1, x1])
  return out


def reference_pipeline(mask, canvas_hw, image_hw, orig_hw):
  """The official order: upsample to the canvas, crop to the image, resize to the original size (float64)."""
  up = torch_bilinear_ref(np.asarray(mask, np.float64), canvas_hw)
  return torch_bilinear_ref(up[: image_hw[0], : image_hw[1]], orig_hw)


def test_bilinear_matrix_matches_known_torch_values():
  # Values printed by torch.nn.functional.interpolate(..., mode='bilinear', align_corners=False).
  np.testing.assert_allclose(bilinear_matrix(2, 4) @ [1.0, 2.0], [1.0, 1.25, 1.75, 2.0])
  np.testing.assert_allclose(bilinear_matrix(4, 2) @ [1.0, 2.0, 3.0, 4.0], [1.5, 3.5])
  np.testing.assert_allclose(bilinear_matrix(3, 2) @ [0.0, 1.0, 2.0], [0.25, 1.75])
  np.testing.assert_allclose(bilinear_matrix(5, 5), np.eye(5))
  np.testing.assert_allclose(bilinear_matrix(3, 7).sum(1), 1.0)


def test_select_topk_order_repeated_queries_and_gathers():
  # B=1, Q=3, C=2. Ranking of sigmoid scores: (q1,c0) > (q1,c1) > (q0,c1) > (q2,c0) > ...
  logits = jnp.array([[[-3.0, 1.0], [3.0, 2.0], [0.5, -5.0]]])
  boxes = jnp.arange(12, dtype=jnp.float32).reshape(1, 3, 4) / 12
  masks = jnp.arange(3, dtype=jnp.float32).reshape(1, 3, 1, 1) * jnp.ones((1, 3, 2, 2))
  top = jax.jit(select_topk, static_argnames='k')(logits, boxes, masks, k=4)
  np.testing.assert_array_equal(top.queries[0], [1, 1, 0, 2])
  np.testing.assert_array_equal(top.labels[0], [0, 1, 1, 0])
  np.testing.assert_allclose(top.scores[0], [_sigmoid(3), _sigmoid(2), _sigmoid(1), _sigmoid(0.5)], rtol=1e-6)
  np.testing.assert_allclose(top.boxes[0], boxes[0, jnp.array([1, 1, 0, 2])])
  np.testing.assert_allclose(top.mask_logits[0, :, 0, 0], [1, 1, 0, 2])
  assert top.mask_logits.shape == (1, 4, 2, 2)
  # k larger than Q * C is clamped; without masks mask_logits is None.
  top = select_topk(logits, boxes, None, k=100)
  assert top.scores.shape == (1, 6) and top.mask_logits is None
  assert sorted(zip(top.queries[0].tolist(), top.labels[0].tolist())) == [(q, c) for q in range(3) for c in range(2)]


def test_mask_score_and_final_score():
  # All sizes equal: the resampling is the identity, so the full-res logits are the given ones.
  m = np.array(
    [
      [[2.0, -1.0], [0.0, 3.0]],  # positives 2 and 3; 0 is not positive
      [[-1.0, -2.0], [-3.0, -4.0]],  # empty mask: mask score 0
    ],
    np.float32,
  )
  hw = (2, 2)
  r = postprocess_image([0.8, 0.5], [4, 7], np.full((2, 4), 0.5), m, hw, hw, hw)
  mask_score = (_sigmoid(2) + _sigmoid(3)) / (2 + 1e-6)
  np.testing.assert_allclose(r['scores'], [0.8 * mask_score, 0.0], rtol=1e-6)
  np.testing.assert_array_equal(r['masks'][0], [[True, False], [False, True]])
  assert not r['masks'][1].any()
  np.testing.assert_array_equal(r['labels'], [4, 7])
  # Detection only: no masks, the score is the class probability.
  r = postprocess_image([0.8, 0.5], [4, 7], np.full((2, 4), 0.5), None, hw, hw, hw)
  assert r['masks'] is None
  np.testing.assert_allclose(r['scores'], [0.8, 0.5])


def test_box_scaling_not_clipped():
  canvas, image, orig = (64, 96), (48, 80), (96, 100)
  boxes = np.array([[0.5, 0.5, 0.2, 0.4], [0.95, 0.1, 0.3, 0.4]], np.float32)
  r = postprocess_image([0.9, 0.9], [0, 0], boxes, None, image, canvas, orig)
  sx, sy = 96 / 80 * 100, 64 / 48 * 96  # 120, 128
  expected = [[0.4 * sx, 0.3 * sy, 0.6 * sx, 0.7 * sy], [0.8 * sx, -0.1 * sy, 1.1 * sx, 0.3 * sy]]
  np.testing.assert_allclose(r['boxes'], expected, rtol=1e-5, atol=1e-4)
  assert r['boxes'][1, 2] > orig[1] and r['boxes'][1, 1] < 0  # outside the image: not clipped


@pytest.mark.parametrize(
  'mask_hw,canvas_hw,image_hw,orig_hw',
  [
    ((5, 7), (20, 28), (17, 23), (31, 12)),  # up in h, down in w
    ((8, 8), (32, 32), (32, 27), (13, 40)),
    ((4, 6), (16, 24), (16, 24), (16, 24)),  # no crop, no resize
  ],
)
def test_upsample_crop_resize_matches_float64_reference(mask_hw, canvas_hw, image_hw, orig_hw):
  rng = np.random.default_rng(0)
  m = rng.normal(size=(3, *mask_hw)).astype(np.float32)
  ref = np.stack([reference_pipeline(x, canvas_hw, image_hw, orig_hw) for x in m])
  ours = upsample_masks(m, canvas_hw, image_hw, orig_hw)
  assert ours.shape == (3, *orig_hw) and ours.dtype == np.float32
  np.testing.assert_allclose(ours, ref, atol=2e-6)

  scores = np.array([0.9, 0.6, 0.3])
  r = postprocess_image(scores, [0, 1, 2], np.full((3, 4), 0.5), m, image_hw, canvas_hw, orig_hw)
  sure = np.abs(ref) > 1e-4
  np.testing.assert_array_equal(r['masks'][sure], (ref > 0)[sure])
  sig = 1 / (1 + np.exp(-ref))
  pos = ref > 0
  ref_scores = scores * (sig * pos).sum((1, 2)) / (pos.sum((1, 2)) + 1e-6)
  np.testing.assert_allclose(r['scores'], ref_scores, rtol=1e-5)


def test_select_topk_from_predictions_uses_last_layer():
  rng = np.random.default_rng(2)
  n, b, q, c = 3, 2, 5, 4
  layers = HeadOutputs(
    jnp.asarray(rng.normal(size=(n, b, q, c)), jnp.float32),
    jnp.asarray(rng.uniform(size=(n, b, q, 4)), jnp.float32),
    jnp.asarray(rng.normal(size=(1, b, q, 3, 3)), jnp.float32),  # inference: masks of the last layer only
  )
  preds = Predictions(layers=layers, interm=zeros_like_head(b, q, c))
  top = jax.jit(select_topk_from_predictions, static_argnames='k')(preds, k=7)
  ref = select_topk(layers.logits[-1], layers.boxes[-1], layers.masks[-1], k=7)
  for x, y in zip(top, ref):
    np.testing.assert_array_equal(x, y)


def test_postprocess_batch_skips_padding_images():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(3, 5, 4)), jnp.float32)
  boxes = jnp.asarray(rng.uniform(0.2, 0.6, size=(3, 5, 4)), jnp.float32)
  masks = jnp.asarray(rng.normal(size=(3, 5, 4, 4)), jnp.float32)
  top = select_topk(logits, boxes, masks, k=6)
  out = postprocess_batch(top, [(16, 12), (16, 16), (10, 16)], (16, 16), [(32, 24), (16, 16), (5, 8)], [1, 0, 1])
  assert len(out) == 2  # the middle image is padding
  assert out[0]['masks'].shape == (6, 32, 24) and out[1]['masks'].shape == (6, 5, 8)
  single = postprocess_image(top.scores[2], top.labels[2], top.boxes[2], top.mask_logits[2], (10, 16), (16, 16), (5, 8))
  for key in ('scores', 'labels', 'boxes', 'masks'):
    np.testing.assert_array_equal(out[1][key], single[key])


def test_threaded_masks_equal_serial_masks(monkeypatch):
  # Large enough for the threads (k * H * W >= 2**22): the same masks and scores to the bit as one thread.
  from dimaskdino_jax.evaluation import postprocess

  rng = np.random.default_rng(3)
  m = (rng.normal(size=(17, 32, 40)) * 3 - 1).astype(np.float32)  # 17 masks: uneven split over the threads
  args = ([0.9] * 17, list(range(17)), np.full((17, 4), 0.5), m, (500, 640), (512, 640), (600, 768))
  results = []
  for threads in (1, 3):
    monkeypatch.setattr(postprocess, 'POSTPROCESS_THREADS', threads)
    results.append(postprocess_image(*args))
  assert 17 * 600 * 768 >= 2**22
  np.testing.assert_array_equal(results[0]['masks'], results[1]['masks'])
  np.testing.assert_array_equal(results[0]['scores'], results[1]['scores'])
  assert 0 < results[0]['masks'].mean() < 1
