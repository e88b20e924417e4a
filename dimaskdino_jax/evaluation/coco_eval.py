"""COCO evaluation of post-processed detections (bbox and segm AP, as detectron2's COCOEvaluator reports them).

    evaluator = COCOEvaluator('annotations/instances_val2017.json', category_ids)
    for image_id, result in ...:           # result: the dict of `postprocess.postprocess_image`
      evaluator.add(image_id, result)
    metrics = evaluator.evaluate()          # {'bbox': {'AP': 46.9, 'AP50': ...}, 'segm': {...}} in percent

Sharp edges handled here (docs/jax_notes.md, "COCO evaluation"): `pycocotools.mask.encode` needs uint8
[H, W, N] in Fortran order and returns bytes counts (decoded to str, JSON-safe); segm results carry no 'bbox'
(otherwise `loadRes` takes the area from the box); `loadRes` mutates its input, so every iou type gets its own
copies; `loadRes` fails on an empty list, so zero detections give AP 0 without calling it.
"""

import contextlib
import copy
import io
import json
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pycocotools.mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

IOU_TYPES = ('bbox', 'segm')
METRIC_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')


def encode_masks(masks) -> list[dict]:
  """Binary masks (N, H, W) -> COCO compressed RLEs {'size': [H, W], 'counts': str}."""
  masks = np.asarray(masks)
  if masks.shape[0] == 0:
    return []
  rles = mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
  for rle in rles:
    rle['counts'] = rle['counts'].decode('utf-8')
  return rles


def results_to_coco(image_id: int, result: Mapping, category_ids: Sequence[int], iou_types=IOU_TYPES) -> dict:
  """One image's detections -> {iou_type: [COCO result dict, ...]}.

  result: 'scores' (N,), 'labels' (N,) contiguous class indices, 'boxes' (N, 4) absolute xyxy, and 'masks'
  (N, H, W) bool for 'segm'. category_ids[label] is the COCO category id of a contiguous label.
  bbox results are [x, y, w, h]; segm results have 'segmentation' (RLE, str counts) and no 'bbox'.
  """
  scores = np.asarray(result['scores'], np.float64)
  labels = np.asarray(result['labels']).astype(np.int64)
  n = scores.shape[0]
  if n and (labels.min() < 0 or labels.max() >= len(category_ids)):
    raise ValueError(f'labels must lie in [0, {len(category_ids)}) (the category_ids list); got {labels.min()}..')
  cats = [int(category_ids[c]) for c in labels]
  out = {}
  if 'bbox' in iou_types:
    xyxy = np.asarray(result['boxes'], np.float64).reshape(n, 4)
    xywh = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)
    out['bbox'] = [
      {
        'image_id': int(image_id),
        'category_id': cats[i],
        'bbox': [float(v) for v in xywh[i]],
        'score': float(scores[i]),
      }
      for i in range(n)
    ]
  if 'segm' in iou_types:
    if result.get('masks') is None:
      raise ValueError(
        "iou type 'segm' needs result['masks']; evaluate a detection-only model with iou_types=('bbox',)"
      )
    rles = encode_masks(result['masks'])
    out['segm'] = [
      {'image_id': int(image_id), 'category_id': cats[i], 'segmentation': rles[i], 'score': float(scores[i])}
      for i in range(n)
    ]
  return out


def load_coco(gt) -> COCO:
  """A pycocotools COCO from a path to an instances json or an existing COCO object (returned as is)."""
  if isinstance(gt, COCO):
    return gt
  with contextlib.redirect_stdout(io.StringIO()):
    return COCO(str(gt))


def _faster_coco_eval():
  try:
    import faster_coco_eval  # noqa: F401  (optional dependency: pip install '.[fast-eval]')
  except ImportError as e:
    raise ImportError(
      'eval.use_faster_coco_eval=True needs faster-coco-eval: pip install faster-coco-eval==1.8.0 '
      '(or set --config.eval.use_faster_coco_eval=False to use pycocotools)'
    ) from e
  from faster_coco_eval import COCO as FCOCO
  from faster_coco_eval import COCOeval_faster

  return FCOCO, COCOeval_faster


def evaluate_detections(
  gt,
  results: Mapping[str, list],
  iou_types=IOU_TYPES,
  img_ids=None,
  use_faster_coco_eval: bool = False,
  verbose: bool = True,
) -> dict:
  """Runs COCOeval for each iou type; returns {iou_type: {'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl'}} in percent.

  gt: path to an instances json or a pycocotools COCO. results: {iou_type: [COCO result dicts]} (not mutated).
  img_ids: the images to evaluate (default: every image of the GT). A metric with no GT in its range is NaN
  (as in detectron2); no detections at all give 0.
  """
  coco_gt = load_coco(gt)
  if use_faster_coco_eval:
    fcoco, fceval = _faster_coco_eval()
    with contextlib.redirect_stdout(io.StringIO()):
      eval_gt = fcoco(copy.deepcopy(coco_gt.dataset))
  out = {}
  for iou_type in iou_types:
    if iou_type not in IOU_TYPES:
      raise ValueError(f'unknown iou type {iou_type!r}; choose from {IOU_TYPES}')
    dets = results.get(iou_type, [])
    if not dets:
      out[iou_type] = {name: 0.0 for name in METRIC_NAMES}
      continue
    dets = copy.deepcopy(dets)  # loadRes adds 'area', 'id' (and 'bbox' for segm) in place
    if iou_type == 'segm':
      for d in dets:
        d.pop('bbox', None)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
      if use_faster_coco_eval:
        coco_dt = eval_gt.loadRes(dets)
        ev = fceval(eval_gt, coco_dt, iouType=iou_type)
      else:
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
      if img_ids is not None:
        ev.params.imgIds = sorted(int(i) for i in img_ids)
      ev.evaluate()
      ev.accumulate()
      ev.summarize()
    if verbose:
      print(f'COCO evaluation, {iou_type}:\n{log.getvalue().strip()}')
    out[iou_type] = {
      name: (float(ev.stats[i]) * 100.0 if ev.stats[i] >= 0 else math.nan) for i, name in enumerate(METRIC_NAMES)
    }
  if verbose:
    print(format_table(out))
  return out


def format_table(metrics: Mapping[str, Mapping[str, float]]) -> str:
  """A markdown table: one row per iou type, one column per metric (percent, 3 decimals)."""
  lines = ['| type | ' + ' | '.join(METRIC_NAMES) + ' |', '|' + '---|' * (len(METRIC_NAMES) + 1)]
  for iou_type, m in metrics.items():
    lines.append(f'| {iou_type} | ' + ' | '.join(f'{m[n]:.3f}' for n in METRIC_NAMES) + ' |')
  return '\n'.join(lines)


class COCOEvaluator:
  """Accumulates per-image results and evaluates them against a COCO ground truth.

  gt: path to an instances json or a pycocotools COCO. category_ids: COCO category id of each contiguous label
  (default: the sorted category ids of the GT, detectron2's mapping). iou_types: ('bbox', 'segm') or ('bbox',)
  for detection-only datasets. Only the images passed to `add` are evaluated (like detectron2 with a subset).
  """

  def __init__(self, gt, category_ids=None, iou_types=IOU_TYPES, use_faster_coco_eval=False):
    self.coco_gt = load_coco(gt)
    self.category_ids = list(category_ids) if category_ids is not None else sorted(self.coco_gt.getCatIds())
    self.iou_types = tuple(iou_types)
    self.use_faster_coco_eval = use_faster_coco_eval
    self.reset()

  def reset(self):
    self.results = {t: [] for t in self.iou_types}
    self.img_ids = []

  def add(self, image_id: int, result: Mapping):
    """Adds one image's detections (the dict of `postprocess_image`); an image with no detections still counts."""
    if int(image_id) not in self.coco_gt.imgs:
      raise ValueError(f'image id {image_id} is not in the ground truth')
    self.img_ids.append(int(image_id))
    for t, dets in results_to_coco(image_id, result, self.category_ids, self.iou_types).items():
      self.results[t].extend(dets)

  def evaluate(self, verbose: bool = True) -> dict:
    return evaluate_detections(
      self.coco_gt,
      self.results,
      self.iou_types,
      img_ids=self.img_ids,
      use_faster_coco_eval=self.use_faster_coco_eval,
      verbose=verbose,
    )

  def dump(self, path):
    """Writes the accumulated results as {iou_type: [...]} JSON (e.g. for a submission or offline evaluation)."""
    with open(path, 'w') as f:
      json.dump(self.results, f)
