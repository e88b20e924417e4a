"""Predictions on image files: the evaluator's jitted predict + post-processing, batched by canvas, drawn and saved.

    predictor = Predictor(config, variables)            # variables: checkpoint.restore_variables(config, dir)
    report = predict_files(predictor, ['a.jpg', 'b.png'], 'out', score_threshold=0.3)

Each image (any size; any PIL mode: grayscale, RGBA, palette, 16-bit are converted to RGB; the EXIF orientation is
applied) is resized like the evaluation (shortest side data.test_short_edge, longest <= data.test_max_size) and
placed top-left in the smallest canvas of data.eval_canvases that holds it (an image that fits none gets its own
canvas, rounded up to model.size_divisibility). Images are grouped by canvas and run in batches of
config.eval.batch_size (the last batch of a canvas padded with blank fillers), so the predict function compiles once
per canvas. The results are those of `postprocess.postprocess_image` in original-image coordinates.

`predict_files` writes OUT/<name>.png per image (masks, boxes, class names and scores of the detections with
score >= score_threshold), OUT/detections.json (those detections in COCO result format: image_id, category_id,
bbox [x, y, w, h], score, segmentation as compressed RLE; plus file_name and category_name) and OUT/images.json
(image ids, files, sizes, drawings, and the files that were skipped with the reason). Missing or unreadable files
are skipped and counted; the summary names them.
"""

import json
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from dimaskdino_jax.data.transforms import (
  DECODE_ERRORS,
  choose_canvas,
  exact_canvas,
  resize_image,
  shortest_edge_hw,
  to_rgb,
)
from dimaskdino_jax.evaluation.coco_eval import results_to_coco
from dimaskdino_jax.evaluation.evaluator import make_predict_fn
from dimaskdino_jax.evaluation.postprocess import postprocess_batch
from dimaskdino_jax.evaluation.visualize import draw_predictions

DETECTIONS_FILE = 'detections.json'
IMAGES_FILE = 'images.json'


class ImageReadError(ValueError):
  """An input image that cannot be used; the message names the file."""


def read_image_size(path) -> tuple[int, int]:
  """(h, w) of an image file after its EXIF orientation, without decoding the pixels; ImageReadError if unusable."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ImageReadError(f'{path}: no such file')
  try:
    with Image.open(path) as im:
      w, h = im.size
      orientation = im.getexif().get(0x0112, 1)
  except DECODE_ERRORS as e:
    raise ImageReadError(f'{path}: not a readable image ({type(e).__name__}: {e})') from None
  return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def load_image(path) -> np.ndarray:
  """The image file as (H, W, 3) uint8 RGB (EXIF orientation applied, any mode converted); ImageReadError if bad."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ImageReadError(f'{path}: no such file')
  try:
    with Image.open(path) as im:
      im.load()
      return to_rgb(ImageOps.exif_transpose(im))
  except DECODE_ERRORS as e:
    raise ImageReadError(f'{path}: not a readable image ({type(e).__name__}: {e})') from None


def class_info(config) -> tuple[list[str], list[int], str]:
  """(class names, COCO category id per contiguous label, where they came from).

  From the prepared dataset of the config (config.data: val split, else train split) when it exists; otherwise
  names 'class_<i>' and category ids 1..C (a warning in the third value says so).
  """
  from dimaskdino_jax.data.tfds_builder import PreparedDataset, is_prepared

  d = config.data
  for split in (d.val_split, d.train_split):
    if is_prepared(d.data_dir, d.name, split):
      prepared = PreparedDataset(d.data_dir, d.name, split)
      if prepared.num_classes == int(config.model.num_classes):
        return list(prepared.category_names), [int(c) for c in prepared.label_to_category_id], prepared.path
  c = int(config.model.num_classes)
  note = (
    f'no prepared dataset {d.name!r} under {d.data_dir!r} with {c} classes: classes are named class_0 .. '
    f'class_{c - 1} with category ids 1..{c}'
  )
  return [f'class_{i}' for i in range(c)], list(range(1, c + 1)), note


class Predictor:
  """Runs the model of `config` on RGB images; compiles once per canvas (the evaluator's cached predict function).

  variables: {'params': ..., 'frozen_bn': ...}. batch_size: images per call (default config.eval.batch_size).
  compiler_options: XLA options of the predict function (tests use a low optimization level).
  """

  def __init__(self, config, variables, *, batch_size: int | None = None, compiler_options: dict | None = None):
    from dimaskdino_jax.modeling.model import build_model  # lazy, like evaluate()

    self.config = config
    d = config.data
    self.short_edge, self.max_size = int(d.test_short_edge), int(d.test_max_size)
    self.canvases = [tuple(int(v) for v in c) for c in d.eval_canvases]
    self.divisibility = int(config.model.get('size_divisibility', 32))
    self.pad_value = np.round(np.asarray(config.model.get('pixel_mean', (0.0, 0.0, 0.0)))).astype(np.uint8)
    self.batch_size = int(batch_size or config.eval.batch_size)
    self.with_masks = bool(config.loss.get('mask_losses', True))
    model = build_model(config)
    options = tuple(sorted((compiler_options or {}).items()))
    self._predict = make_predict_fn(model, int(config.eval.detections_per_image), self.with_masks, False, options)
    self.variables = jax.device_put(variables)

  def resized_hw(self, hw) -> tuple[int, int]:
    return shortest_edge_hw(int(hw[0]), int(hw[1]), self.short_edge, self.max_size)

  def canvas_for(self, hw) -> tuple[int, int]:
    """The canvas of an original image size: the smallest eval canvas holding it, else its own padded size."""
    resized = self.resized_hw(hw)
    try:
      return choose_canvas(resized, self.canvases) if self.canvases else exact_canvas(resized, self.divisibility)
    except ValueError:
      return exact_canvas(resized, self.divisibility)

  def _place(self, image, canvas):
    nh, nw = self.resized_hw(image.shape[:2])
    out = np.empty((*canvas, 3), np.uint8)
    out[...] = self.pad_value
    out[:nh, :nw] = resize_image(np.ascontiguousarray(image), (nh, nw))
    return out, (nh, nw)

  def predict_batch(self, images: Sequence[np.ndarray], canvas) -> list[dict]:
    """Post-processed results of up to batch_size (H, W, 3) uint8 images that all use `canvas`."""
    if not 0 < len(images) <= self.batch_size:
      raise ValueError(f'predict_batch takes 1..{self.batch_size} images, got {len(images)}')
    batch = np.empty((self.batch_size, *canvas, 3), np.uint8)
    batch[...] = self.pad_value
    image_hw = np.tile(np.asarray(canvas, np.int32), (self.batch_size, 1))  # fillers: the whole canvas
    orig_hw = image_hw.copy()
    for i, image in enumerate(images):
      batch[i], image_hw[i] = self._place(image, canvas)
      orig_hw[i] = image.shape[:2]
    outputs = self._predict(self.variables, batch, image_hw)
    valid = np.arange(self.batch_size) < len(images)
    return postprocess_batch(outputs[0], image_hw, canvas, orig_hw, valid)

  def __call__(self, images: Sequence[np.ndarray]) -> list[dict]:
    """Results for (H, W, 3) uint8 RGB images of any sizes, in input order."""
    results: list[dict | None] = [None] * len(images)
    for canvas, idx in _group_items((i, self.canvas_for(im.shape[:2])) for i, im in enumerate(images)).items():
      for s in range(0, len(idx), self.batch_size):
        chunk = idx[s : s + self.batch_size]
        for i, r in zip(chunk, self.predict_batch([images[i] for i in chunk], canvas)):
          results[i] = r
    return results


def _png_names(paths) -> list[str]:
  """OUT file names '<stem>.png', made unique with '_<n>' where two inputs share a stem."""
  used, names = set(), []
  for p in paths:
    stem = os.path.splitext(os.path.basename(os.fspath(p)))[0] or 'image'
    name, n = f'{stem}.png', 1
    while name in used:
      name, n = f'{stem}_{n}.png', n + 1
    used.add(name)
    names.append(name)
  return names


def _keep(result: dict, threshold: float) -> dict:
  keep = np.asarray(result['scores']) >= threshold
  keep = np.flatnonzero(keep)[np.argsort(-np.asarray(result['scores'])[keep], kind='stable')]
  return {k: (None if v is None else np.asarray(v)[keep]) for k, v in result.items()}


def predict_files(
  predictor: Predictor,
  paths: Sequence,
  out_dir: str,
  *,
  score_threshold: float = 0.3,
  class_names: Sequence[str] | None = None,
  category_ids: Sequence[int] | None = None,
  draw: bool = True,
  verbose: bool = True,
  on_result: Callable | None = None,
) -> dict:
  """Predicts every image file of `paths`, writes the drawings and JSON files (module docstring) to out_dir.

  class_names / category_ids: per contiguous label (default: `class_info(predictor.config)`). Images get ids 1..N in
  input order (skipped files keep their id, unused). on_result(path, result) is called with each kept result.
  Returns {'images': [...], 'skipped': [{'file', 'reason'}], 'num_detections': int, 'detections_file': path}.
  """
  if class_names is None or category_ids is None:
    names, ids, _ = class_info(predictor.config)
    class_names = names if class_names is None else class_names
    category_ids = ids if category_ids is None else category_ids
  os.makedirs(out_dir, exist_ok=True)
  pngs = _png_names(paths)
  skipped, sizes = [], {}
  for i, p in enumerate(paths):
    try:
      sizes[i] = read_image_size(p)
    except ImageReadError as e:
      skipped.append({'file': os.fspath(p), 'reason': str(e)})
  groups = _group_items((i, predictor.canvas_for(hw)) for i, hw in sizes.items())
  iou_types = ('bbox', 'segm') if predictor.with_masks else ('bbox',)
  detections, images = [], []
  bar = tqdm(total=len(sizes), unit='img', desc='predict', disable=not verbose, dynamic_ncols=True)
  for canvas, idx in groups.items():
    for s in range(0, len(idx), predictor.batch_size):
      loaded = []
      for i in idx[s : s + predictor.batch_size]:
        try:
          loaded.append((i, load_image(paths[i])))
        except ImageReadError as e:  # readable header, broken pixels
          skipped.append({'file': os.fspath(paths[i]), 'reason': str(e)})
          bar.update(1)
      if not loaded:
        continue
      results = predictor.predict_batch([im for _, im in loaded], canvas)
      for (i, image), result in zip(loaded, results):
        kept = _keep(result, score_threshold)
        coco = results_to_coco(i + 1, kept, category_ids, iou_types)
        for j in range(len(kept['scores'])):
          det = dict(coco['bbox'][j])
          if 'segm' in coco:
            det['segmentation'] = coco['segm'][j]['segmentation']
          det['file_name'] = os.fspath(paths[i])
          det['category_name'] = str(class_names[int(kept['labels'][j])])
          detections.append(det)
        entry = {'id': i + 1, 'file_name': os.fspath(paths[i]), 'height': image.shape[0], 'width': image.shape[1]}
        entry['num_detections'] = len(kept['scores'])
        if draw:
          draw_predictions(image, kept, class_names, score_threshold).save(os.path.join(out_dir, pngs[i]))
          entry['drawing'] = pngs[i]
        images.append(entry)
        if on_result is not None:
          on_result(paths[i], result)
        bar.update(1)
  bar.close()
  images.sort(key=lambda e: e['id'])
  detections.sort(key=lambda d: (d['image_id'], -d['score']))
  skipped.sort(key=lambda s: s['file'])
  det_path = os.path.join(out_dir, DETECTIONS_FILE)
  _write_json(det_path, detections)
  _write_json(
    os.path.join(out_dir, IMAGES_FILE),
    {
      'images': images,
      'skipped': skipped,
      'score_threshold': score_threshold,
      'categories': [{'id': int(c), 'name': str(n)} for c, n in zip(category_ids, class_names)],
    },
  )
  report = {'images': images, 'skipped': skipped, 'num_detections': len(detections), 'detections_file': det_path}
  if verbose:
    print(summary_text(report, out_dir), flush=True)
  return report


def _group_items(pairs) -> dict:
  """{canvas: [index, ...]} from (index, canvas) pairs, in first-seen order."""
  groups: dict[tuple[int, int], list[int]] = {}
  for i, c in pairs:
    groups.setdefault(c, []).append(i)
  return groups


def summary_text(report: dict, out_dir: str) -> str:
  lines = [
    f'predicted {len(report["images"])} images, {report["num_detections"]} detections above the threshold; '
    f'wrote {out_dir}/*.png, {report["detections_file"]}'
  ]
  if report['skipped']:
    lines.append(f'skipped {len(report["skipped"])} files:')
    lines += [f'  {s["reason"]}' for s in report['skipped']]
  return '\n'.join(lines)


def _write_json(path, obj):
  with open(path + '.tmp', 'w') as f:
    json.dump(obj, f)
  os.replace(path + '.tmp', path)
