"""COCO evaluation through our evaluator on a tiny generated instances json (written here, nothing downloaded)."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pycocotools.mask as mask_util
import pytest
from pycocotools.coco import COCO

from dimaskdino_jax.evaluation.coco_eval import COCOEvaluator, encode_masks, evaluate_detections, results_to_coco
from dimaskdino_jax.evaluation.postprocess import postprocess_image, select_topk

CATEGORY_IDS = [1, 3, 7]  # non-contiguous on purpose: label i <-> CATEGORY_IDS[i]
# (image id, (h, w), [(label, (x0, y0, x1, y1) rectangle, multiples of 8)]); areas span small / medium / large.
IMAGES = [
  (11, (256, 320), [(0, (16, 24, 40, 48)), (1, (80, 64, 240, 200)), (2, (200, 8, 312, 72))]),
  (12, (192, 256), [(1, (8, 8, 32, 40)), (1, (104, 96, 176, 168))]),
  (13, (256, 192), [(2, (40, 40, 160, 248))]),
]


def _mask(hw, rect):
  m = np.zeros(hw, bool)
  x0, y0, x1, y1 = rect
  m[y0:y1, x0:x1] = True
  return m


def _ring(hw):
  """A non-rectangular (ring) mask, to exercise RLE with several runs per column."""
  yy, xx = np.mgrid[: hw[0], : hw[1]]
  r = np.hypot(yy - 60.0, xx - 60.0)
  return (r < 40) & (r > 20)


def write_gt(path):
  images, anns = [], []
  for image_id, (h, w), insts in IMAGES:
    images.append({'id': image_id, 'height': h, 'width': w, 'file_name': f'{image_id}.jpg'})
    masks = [_mask((h, w), rect) for _, rect in insts] + ([_ring((h, w))] if image_id == 12 else [])
    labels = [lab for lab, _ in insts] + ([0] if image_id == 12 else [])
    for m, lab in zip(masks, labels):
      rle = encode_masks(m[None])[0]
      anns.append(
        {
          'id': len(anns) + 1,
          'image_id': image_id,
          'category_id': CATEGORY_IDS[lab],
          'segmentation': rle,
          'area': float(mask_util.area(rle)),
          'bbox': [float(v) for v in mask_util.toBbox(rle)],
          'iscrowd': 0,
        }
      )
  cats = [{'id': c, 'name': f'c{c}', 'supercategory': 'thing'} for c in CATEGORY_IDS]
  with open(path, 'w') as f:
    json.dump({'images': images, 'annotations': anns, 'categories': cats}, f)
  return path


@pytest.fixture
def gt_path(tmp_path):
  return str(write_gt(tmp_path / 'instances.json'))


def perfect_results(coco):
  """Per image: the GT itself (absolute xyxy boxes, masks), score 1."""
  out = {}
  for image_id in coco.getImgIds():
    anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
    boxes = np.array(
      [[a['bbox'][0], a['bbox'][1], a['bbox'][0] + a['bbox'][2], a['bbox'][1] + a['bbox'][3]] for a in anns]
    )
    out[image_id] = {
      'scores': np.ones(len(anns)),
      'labels': np.array([CATEGORY_IDS.index(a['category_id']) for a in anns]),
      'boxes': boxes,
      'masks': np.stack([coco.annToMask(a).astype(bool) for a in anns]),
    }
  return out


def test_results_to_coco_format():
  masks = np.zeros((2, 6, 5), bool)
  masks[0, 1:4, 2:5] = True
  r = {'scores': [0.9, 0.2], 'labels': [2, 0], 'boxes': [[1.0, 2.0, 4.0, 6.0], [0, 0, 1, 1]], 'masks': masks}
  out = results_to_coco(5, r, CATEGORY_IDS)
  assert out['bbox'][0] == {'image_id': 5, 'category_id': 7, 'bbox': [1.0, 2.0, 3.0, 4.0], 'score': 0.9}
  assert out['bbox'][1]['category_id'] == 1
  seg = out['segm'][0]
  assert 'bbox' not in seg and isinstance(seg['segmentation']['counts'], str)
  assert seg['segmentation']['size'] == [6, 5]
  np.testing.assert_array_equal(mask_util.decode(seg['segmentation']), masks[0])
  json.dumps(out)  # JSON-safe
  assert set(results_to_coco(5, {**r, 'masks': None}, CATEGORY_IDS, iou_types=('bbox',))) == {'bbox'}
  with pytest.raises(ValueError, match='segm'):
    results_to_coco(5, {**r, 'masks': None}, CATEGORY_IDS)


@pytest.mark.parametrize('gt_as', ['path', 'coco'])
def test_perfect_predictions_give_ap_100(gt_path, gt_as):
  coco = COCO(gt_path)
  ev = COCOEvaluator(gt_path if gt_as == 'path' else coco, CATEGORY_IDS)
  for image_id, r in perfect_results(coco).items():
    ev.add(image_id, r)
  before = json.dumps(ev.results)
  m = ev.evaluate(verbose=False)
  assert json.dumps(ev.results) == before  # loadRes worked on copies
  for t in ('bbox', 'segm'):
    for name in ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl'):
      assert m[t][name] == pytest.approx(100.0), (t, name, m[t])


@pytest.mark.parametrize('downscale', [1, 2])
def test_perfect_predictions_through_postprocessing(gt_path, downscale):
  """Logits built from the GT -> select_topk -> postprocess_image -> evaluator: AP 100.

  Each image is resized by 1/downscale into a canvas (multiple of 32, with padding) with masks at stride 4. Without
  a resize, rectangle edges on multiples of 4 in the canvas and logits +6.2 inside / -3.8 outside make the bilinear
  upsampling (edge pixels 0.375 / 0.625 inside, corner pixels 0.39) and the threshold at 0 reproduce the GT masks
  exactly; with the 2x resize back to the original size (logits +-10) only the corners differ (IoU > 0.95).
  """
  ev = COCOEvaluator(gt_path, CATEGORY_IDS)
  for image_id, (h, w), insts in IMAGES:
    if image_id == 12:
      continue  # the ring is not reproducible from a stride-4 map: tested with perfect masks above
    image_hw = (h // downscale, w // downscale)
    canvas_hw = (-(-image_hw[0] // 32) * 32 + 32, -(-image_hw[1] // 32) * 32)
    mh, mw = canvas_hw[0] // 4, canvas_hw[1] // 4
    q, c = len(insts) + 2, len(CATEGORY_IDS)  # two extra queries: background
    logits = np.full((q, c), -10.0)
    boxes = np.full((q, 4), 0.5)
    inside, outside = (6.2, -3.8) if downscale == 1 else (10.0, -10.0)
    masks = np.full((q, mh, mw), outside)
    s = 4 * downscale  # original pixels per mask cell
    for i, (label, (x0, y0, x1, y1)) in enumerate(insts):
      logits[i, label] = 10.0
      # original -> canvas-normalized cxcywh: divide by the resize factor and by the canvas size.
      cx, cy, bw, bh = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
      boxes[i] = np.array([cx, cy, bw, bh]) / downscale / np.array([canvas_hw[1], canvas_hw[0]] * 2)
      masks[i, y0 // s : y1 // s, x0 // s : x1 // s] = inside
    top = select_topk(jnp.asarray(logits[None]), jnp.asarray(boxes[None]), jnp.asarray(masks[None]), k=100)
    r = postprocess_image(top.scores[0], top.labels[0], top.boxes[0], top.mask_logits[0], image_hw, canvas_hw, (h, w))
    assert len(r['scores']) == q * c
    for i, (label, rect) in enumerate(insts):
      j = int(np.flatnonzero((np.asarray(top.queries[0]) == i) & (r['labels'] == label))[0])
      np.testing.assert_allclose(r['boxes'][j], rect, atol=1e-3)
      gt = _mask((h, w), rect)
      iou = (r['masks'][j] & gt).sum() / (r['masks'][j] | gt).sum()
      if downscale == 1:
        np.testing.assert_array_equal(r['masks'][j], gt)
      else:
        assert 0.95 < iou < 1.0
    ev.add(image_id, r)
  m = ev.evaluate(verbose=False)
  for t in ('bbox', 'segm'):
    assert m[t]['AP'] == pytest.approx(100.0) and m[t]['AP75'] == pytest.approx(100.0), m


def test_one_false_positive_ranked_first_halves_ap(gt_path):
  # Image 13 only, bbox only: its one GT (label 2), a wrong box at 0.9 and the exact box at 0.8 -> precision 1/2 at
  # every recall threshold: AP = 50. The other categories have no GT in this image: not counted.
  ev = COCOEvaluator(gt_path, CATEGORY_IDS, iou_types=('bbox',))
  ev.add(13, {'scores': [0.9, 0.8], 'labels': [2, 2], 'boxes': [[0, 0, 20, 20], [40, 40, 160, 248]]})
  m = ev.evaluate(verbose=False)
  assert set(m) == {'bbox'}
  assert m['bbox']['AP'] == pytest.approx(50.0) and m['bbox']['AP50'] == pytest.approx(50.0)
  assert math.isnan(m['bbox']['APs'])  # no small GT in image 13: NaN like detectron2


def test_zero_detections_give_zero(gt_path, capsys):
  ev = COCOEvaluator(gt_path, CATEGORY_IDS)
  for image_id, _, _ in IMAGES:
    empty = {'scores': np.zeros(0), 'labels': np.zeros(0, int), 'boxes': np.zeros((0, 4)), 'masks': np.zeros((0, 4, 4))}
    ev.add(image_id, empty)
  m = ev.evaluate()
  assert m == {t: dict.fromkeys(('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl'), 0.0) for t in ('bbox', 'segm')}
  assert '| segm |' in capsys.readouterr().out  # the table is printed
  assert evaluate_detections(gt_path, {}, iou_types=('bbox',), verbose=False) == {'bbox': m['bbox']}


def test_faster_coco_eval_same_numbers(gt_path):
  pytest.importorskip('faster_coco_eval')
  coco = COCO(gt_path)
  results = {'bbox': [], 'segm': []}
  rng = np.random.default_rng(0)
  for image_id, r in perfect_results(coco).items():
    r = {**r, 'scores': rng.uniform(size=len(r['scores'])), 'boxes': r['boxes'] + rng.normal(0, 3, r['boxes'].shape)}
    for t, dets in results_to_coco(image_id, r, CATEGORY_IDS).items():
      results[t].extend(dets)
  ref = evaluate_detections(coco, results, verbose=False)
  fast = evaluate_detections(coco, results, use_faster_coco_eval=True, verbose=False)
  for t in ref:
    for name, v in ref[t].items():
      assert fast[t][name] == pytest.approx(v, abs=1e-6, nan_ok=True)
