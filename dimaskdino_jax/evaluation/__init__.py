"""Inference post-processing (`postprocess`) and COCO evaluation (`coco_eval`); docs/architecture.md,
"Inference post-processing"."""

from dimaskdino_jax.evaluation.coco_eval import COCOEvaluator, evaluate_detections, results_to_coco
from dimaskdino_jax.evaluation.postprocess import (
  TopK,
  postprocess_batch,
  postprocess_image,
  select_topk,
  select_topk_from_predictions,
)

__all__ = [
  'COCOEvaluator',
  'TopK',
  'evaluate_detections',
  'postprocess_batch',
  'postprocess_image',
  'results_to_coco',
  'select_topk',
  'select_topk_from_predictions',
]
