"""COCO evaluation of a model on a prepared split: jitted predict per canvas -> host post-processing -> COCOeval.

    metrics = evaluate(config, {'params': ..., 'frozen_bn': ...}, out_dir='runs/x/eval')
    metrics['bbox']['AP'], metrics['segm']['AP']     # percent; also written to out_dir/metrics.json

Flow (docs/architecture.md, "Evaluation"): `EvalLoader` yields static batches grouped by canvas; one jitted `predict`
(model.apply in inference mode + `select_topk` on the device, k = config.eval.detections_per_image) compiles once
per canvas shape and is reused by later `evaluate` calls with the same model (e.g. the trainer's periodic
evaluation); while the device runs batch i + 1, the host post-processes batch i (`postprocess_batch`: mask
upsampling, crop, threshold, box scaling), converts it to COCO results with the dataset's category ids and
accumulates them in a `COCOEvaluator`. Filler entries (`is_padding`) are skipped.

With `per_layer=True` the model computes masks for every entry of `Predictions.layers` (all_layer_masks=True) and
each entry is evaluated on its own: 'initial' (the query selection before the decoder), then 'decoder_0' ...
'decoder_{L-1}'; the last one is the model's output and gives the top-level metrics.

metrics.json: {"bbox": {"AP", "AP50", "AP75", "APs", "APm", "APl"}, "segm": {...}, ["per_layer": [{"layer": name,
"bbox": {...}, "segm": {...}}, ...]]}, AP in percent; a size bucket with no ground truth is NaN (written as the
JSON extension `NaN`, which Python's json reads). "segm" is left out when config.loss.mask_losses is False or the
ground truth has no segmentations.

Checkpoints are found and read by training/checkpoint.py (`resolve_checkpoint`, `restore_variables`), which every
reader of a checkpoint (this module's callers, the trainer, the converter) imports from below.

Several local devices: each batch is split over them when the batch size divides. Several processes (multi-host,
jax.distributed): each process evaluates its own share of the images (`EvalLoader` sharded by process) on its local
devices, the per-image COCO results of every process are gathered to process 0 (`gather_to_process0`: JSON bytes
in one fixed-size `process_allgather`), which checks that every image was evaluated exactly once
(`merge_process_results`), runs the COCO evaluation alone and writes the files; the metrics are then shared so that
every process returns the same dict.
"""

import collections
import functools
import json
import math
import os
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from dimaskdino_jax.data.pipeline import EvalLoader
from dimaskdino_jax.data.transforms import decode_image
from dimaskdino_jax.evaluation.coco_eval import METRIC_NAMES, COCOEvaluator
from dimaskdino_jax.evaluation.postprocess import postprocess_batch, select_topk
from dimaskdino_jax.evaluation.visualize import save_prediction_grid

METRICS_FILE = 'metrics.json'
PREDICTIONS_FILE = 'predictions.png'

# Traces of the predict function per canvas (H, W): a trace is a compilation. Tests read it (reset it first).
PREDICT_TRACES: collections.Counter = collections.Counter()


def layer_names(num_entries: int) -> list[str]:
  """Names of the entries of `Predictions.layers`: 'initial', then 'decoder_0' .. 'decoder_{num_entries - 2}'."""
  return ['initial'] + [f'decoder_{i}' for i in range(num_entries - 1)]


@functools.lru_cache(maxsize=8)
def make_predict_fn(model, k: int, with_masks: bool, per_layer: bool, compiler_options: tuple = ()):
  """A jitted predict(variables, images, image_hw) -> tuple of TopK (one per evaluated entry of layers).

  model: the Flax module (hashable: equal configs share the cache entry, so a model compiles once per canvas even
  across `evaluate` calls). per_layer: all_layer_masks=True and one TopK per entry of `Predictions.layers`, else one
  TopK of the last decoder layer. with_masks: False leaves the mask logits out (box-only evaluation).
  compiler_options: sorted (name, value) pairs of XLA options (tests use a low optimization level).
  """

  def predict(variables, images, image_hw):
    PREDICT_TRACES[tuple(images.shape[1:3])] += 1  # runs at trace time only
    preds = model.apply(variables, images, image_hw=image_hw, train=False, all_layer_masks=per_layer)
    entries = range(preds.num_layers) if per_layer else [preds.num_layers - 1]
    out = []
    for i in entries:
      head = preds.layers.layer(i)
      out.append(select_topk(head.logits, head.boxes, head.masks if with_masks else None, k=k))
    return tuple(out)

  return jax.jit(predict, compiler_options=dict(compiler_options) or None)


def iou_types_for(config, coco_gt) -> tuple[str, ...]:
  """('bbox', 'segm'), or ('bbox',) when config.loss.mask_losses is False or no GT annotation has a segmentation."""
  anns = coco_gt.dataset.get('annotations', [])
  has_masks = any('segmentation' in a for a in anns) or not anns
  if bool(config.loss.get('mask_losses', True)) and has_masks:
    return ('bbox', 'segm')
  return ('bbox',)


class _Placement:
  """Puts variables (replicated) and batches (split on the batch axis when it divides) on the local devices."""

  def __init__(self):
    devices = jax.local_devices()
    self.mesh = Mesh(np.asarray(devices), ('batch',))
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    self.split = NamedSharding(self.mesh, PartitionSpec('batch'))
    self.num_devices = len(devices)

  def variables(self, variables):
    return jax.device_put(variables, self.replicated)

  def batch(self, x):
    sharding = self.split if x.shape[0] % self.num_devices == 0 else self.replicated
    return jax.device_put(x, sharding)


def _check_classes(config, prepared):
  if int(config.model.num_classes) != prepared.num_classes:
    raise ValueError(
      f'config.model.num_classes = {config.model.num_classes} but {prepared.path} has {prepared.num_classes} '
      f'categories ({", ".join(prepared.category_names)}); set --config.model.num_classes={prepared.num_classes} '
      'or evaluate on the dataset the model was trained for'
    )


def _original_images(prepared, image_ids):
  """Decoded original images (H, W, 3) uint8 of the given ids, from the prepared records."""
  record_of = {int(i): r for r, i in enumerate(prepared.index['image_id'])}
  return [decode_image(prepared.data_source[record_of[int(i)]]['image']) for i in image_ids]


def format_per_layer_table(per_layer) -> str:
  """A markdown table: one row per layer entry, AP / AP50 / AP75 of each iou type."""
  types = [t for t in ('bbox', 'segm') if per_layer and t in per_layer[0]]
  cols = [f'{t} {n}' for t in types for n in ('AP', 'AP50', 'AP75')]
  lines = ['| layer | ' + ' | '.join(cols) + ' |', '|' + '---|' * (len(cols) + 1)]
  for entry in per_layer:
    vals = [entry[t][n] for t in types for n in ('AP', 'AP50', 'AP75')]
    lines.append(f'| {entry["layer"]} | ' + ' | '.join(f'{v:.3f}' for v in vals) + ' |')
  return '\n'.join(lines)


class EvalPlan:
  """What one evaluation reads and computes, built before any prediction (`plan_evaluation`).

  loader: this process's batches; prepared: the split; all_ids: every image of the split (the union of the
  processes' shares); iou_types: ('bbox', ['segm']); names: the evaluated entries ('final', or 'initial',
  'decoder_0', ...); evaluators: one COCOEvaluator per entry; predict: the jitted predict function.
  """

  def __init__(self, loader, all_ids, iou_types, names, evaluators, predict):
    self.loader, self.prepared, self.all_ids = loader, loader.prepared, all_ids
    self.iou_types, self.names, self.evaluators, self.predict = iou_types, names, evaluators, predict


def plan_evaluation(config, *, split, mode, per_layer, max_images, compiler_options) -> EvalPlan:
  """Opens the split (this process's share), checks its classes against the model and builds the evaluators and the
  jitted predict function (compiled once per canvas, shared with earlier calls for the same model)."""
  from dimaskdino_jax.modeling.model import build_model  # lazy: the only place evaluation touches the model

  procs, me = jax.process_count(), jax.process_index()
  loader = EvalLoader(config, split=split, mode=mode, max_images=max_images, shard_index=me, shard_count=procs)
  all_ids = loader.image_ids
  if procs > 1:  # every image of the split, read from the index only
    all_ids = EvalLoader(config, split=split, mode=mode, max_images=max_images, prepared=loader.prepared).image_ids
  if len(all_ids) == 0:
    raise ValueError(f'{loader.prepared.path}: no images to evaluate')
  _check_classes(config, loader.prepared)
  coco_gt = loader.prepared.coco()
  iou_types = iou_types_for(config, coco_gt)
  category_ids = [int(c) for c in loader.prepared.label_to_category_id]
  use_fast = bool(config.eval.get('use_faster_coco_eval', False))
  k = int(config.eval.detections_per_image)
  options = tuple(sorted((compiler_options or {}).items()))
  predict = make_predict_fn(build_model(config), k, 'segm' in iou_types, bool(per_layer), options)
  names = layer_names(int(config.model.decoder.num_layers) + 1) if per_layer else ['final']
  evaluators = [COCOEvaluator(coco_gt, category_ids, iou_types, use_faster_coco_eval=use_fast) for _ in names]
  return EvalPlan(loader, all_ids, iou_types, names, evaluators, predict)


def predict_all(plan: EvalPlan, variables, *, num_visualize: int, verbose: bool):
  """Runs the predict function over this process's batches and feeds every evaluator; returns (undecodable image
  ids, ids and results of the first `num_visualize` images of the last entry).

  While the device runs batch i + 1, the host post-processes batch i (mask upsampling, crop, threshold, scaling).
  """
  place = _Placement()
  variables = place.variables(_local_copy(variables))
  evaluators = plan.evaluators
  vis_ids, vis_results, undecodable = [], [], []
  show = verbose and jax.process_index() == 0
  bar = tqdm(total=plan.loader.num_images, unit='img', desc='eval', disable=not show, dynamic_ncols=True)

  def consume(batch, outputs):
    if 'record_error' in batch:  # val records that could not be decoded (the loader marks them as padding)
      undecodable.extend(np.asarray(batch['image_id'])[np.asarray(batch['record_error'], bool)].tolist())
    valid = ~np.asarray(batch['is_padding'], bool)
    ids = np.asarray(batch['image_id'])[valid]
    canvas = tuple(batch['image'].shape[1:3])
    if len(outputs) != len(evaluators):
      raise AssertionError(f'predict returned {len(outputs)} entries for {len(evaluators)} evaluators')
    for j, (topk, ev) in enumerate(zip(outputs, evaluators)):
      results = postprocess_batch(topk, batch['image_hw'], canvas, batch['orig_hw'], valid)
      for image_id, result in zip(ids, results):
        ev.add(int(image_id), result)
        if j == len(evaluators) - 1 and len(vis_ids) < num_visualize:
          vis_ids.append(int(image_id))
          vis_results.append(result)
    bar.update(len(ids))

  pending = None
  for batch in plan.loader:
    # Dispatch this batch (asynchronous) before post-processing the previous one on the host.
    images, image_hw = place.batch(batch['image']), place.batch(np.asarray(batch['image_hw'], np.int32))
    outputs = plan.predict(variables, images, image_hw)
    if pending is not None:
      consume(*pending)
    pending = (batch, outputs)
  if pending is not None:
    consume(*pending)
  bar.close()
  return undecodable, (vis_ids, vis_results)


def compute_metrics(plan: EvalPlan, undecodable, *, per_layer: bool, verbose: bool) -> dict:
  """COCO metrics of every evaluated entry (the last one at the top level), image counts and the per-layer list."""
  layer_metrics = []
  for j, ev in enumerate(plan.evaluators):
    layer_metrics.append(ev.evaluate(verbose=verbose and j == len(plan.evaluators) - 1))
  metrics = dict(layer_metrics[-1])
  # Undecodable images are left out of the COCO evaluation (their GT too): counted here, never dropped silently.
  metrics['images'] = {'evaluated': len(plan.all_ids) - len(undecodable), 'undecodable': len(undecodable)}
  if undecodable:
    print(
      f'warning: {len(undecodable)} val images could not be decoded and are not evaluated: ids '
      f'{sorted(undecodable)[:20]}{" ..." if len(undecodable) > 20 else ""}',
      flush=True,
    )
  if per_layer:
    metrics['per_layer'] = [{'layer': name, **m} for name, m in zip(plan.names, layer_metrics)]
    if verbose:
      print('per-layer AP:\n' + format_per_layer_table(metrics['per_layer']), flush=True)
  return metrics


def write_outputs(plan: EvalPlan, metrics: dict, out_dir: str, visualized, verbose: bool) -> None:
  """OUT_DIR/metrics.json (written atomically) and OUT_DIR/predictions.png of the visualized images."""
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, METRICS_FILE)
  with open(path + '.tmp', 'w') as f:
    json.dump(metrics, f, indent=2)
  os.replace(path + '.tmp', path)
  vis_ids, vis_results = visualized
  if vis_ids:
    save_prediction_grid(
      os.path.join(out_dir, PREDICTIONS_FILE),
      _original_images(plan.prepared, vis_ids),
      vis_results,
      plan.prepared.category_names,
      titles=[f'id {i}' for i in vis_ids],
    )
  if verbose:
    print(f'wrote {path}', flush=True)


def evaluate(
  config,
  variables,
  *,
  split: str | None = None,
  mode: str = 'buckets',
  per_layer: bool = False,
  max_images: int | None = None,
  out_dir: str | None = None,
  verbose: bool = True,
  num_visualize: int = 0,
  compiler_options: dict | None = None,
) -> dict:
  """Evaluates `variables` ({'params': ..., 'frozen_bn': ...}) on a prepared split; returns the metrics dict.

  split: default config.data.val_split. mode: 'buckets' (the config's eval canvases) or 'exact' (each image padded
  to a multiple of size_divisibility: one compilation per distinct size). max_images: the first N images (default
  config.eval.max_images; 0 = all). out_dir: where metrics.json (and predictions.png) are written; None writes
  nothing. num_visualize: with out_dir, the first N images with their predictions (score >= 0.3) are drawn side by
  side in out_dir/predictions.png. compiler_options: XLA options for the predict function.
  Returns {'bbox': {...}, 'segm': {...}, ['per_layer': [...]]} (see the module docstring).

  The steps: `plan_evaluation` -> `predict_all` (this process's images) -> with several processes,
  `gather_process_shares` (process 0 continues, the others wait for its metrics) -> `compute_metrics` ->
  `write_outputs` (process 0) -> the metrics shared with every process.
  """
  procs, me = jax.process_count(), jax.process_index()
  start = time.time()
  plan = plan_evaluation(
    config, split=split, mode=mode, per_layer=per_layer, max_images=max_images, compiler_options=compiler_options
  )
  writes = out_dir is not None and me == 0
  undecodable, visualized = predict_all(plan, variables, num_visualize=num_visualize if writes else 0, verbose=verbose)
  predict_s = time.time() - start
  if procs > 1:
    undecodable = gather_process_shares(plan, undecodable)
    if me != 0:  # process 0 evaluates; the others wait for its metrics
      return share_from_process0(None)
  metrics = compute_metrics(plan, undecodable, per_layer=per_layer, verbose=verbose)
  if verbose:
    processes = f' by {procs} processes' if procs > 1 else ''
    print(
      f'evaluated {len(plan.all_ids)} images of {plan.prepared.name}/{plan.prepared.split}{processes} ({mode}, '
      f'canvases {plan.loader.canvases}) in {time.time() - start:.1f}s ({predict_s:.1f}s predict + post-process)',
      flush=True,
    )
  if writes:
    write_outputs(plan, metrics, out_dir, visualized, verbose)
  if procs > 1:
    share_from_process0(metrics)
  return metrics


# ------------------------------------------------------------------------------------------------ multi-host
def _local_copy(tree):
  """Arrays spanning other processes' devices (a multi-host training state, replicated) -> this process's copy
  (host numpy); other leaves unchanged. The evaluation runs on the local devices only."""

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(x.addressable_shards[0].data)
    return x

  return jax.tree.map(one, tree)


def gather_process_shares(plan: EvalPlan, undecodable: list) -> list | None:
  """Several processes: every process's per-image results (and undecodable ids) go to process 0, which checks that
  each image of the split was evaluated exactly once and puts the merged results into its evaluators. Returns the
  merged undecodable ids on process 0, None elsewhere. A collective: every process calls it."""
  local = [{'img_ids': ev.img_ids, 'results': ev.results, 'undecodable': undecodable} for ev in plan.evaluators]
  shares = gather_to_process0(local)
  if jax.process_index() != 0:
    return None
  merged = merge_process_results(shares, plan.all_ids)
  for ev, share in zip(plan.evaluators, merged):
    ev.img_ids, ev.results = share['img_ids'], share['results']
  return merged[0]['undecodable']


def _allgather_bytes(payload: bytes) -> list[bytes]:
  """Every process's `payload`, in process order, on every process (two fixed-size process_allgather calls)."""
  from jax.experimental import multihost_utils

  data = np.frombuffer(payload, np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int32))).reshape(-1)
  padded = np.zeros((int(sizes.max()) if sizes.size else 0,), np.uint8)
  padded[: data.size] = data
  rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
  return [rows[i, : int(n)].tobytes() for i, n in enumerate(sizes)]


def gather_to_process0(shares: list[dict]) -> list[list[dict]] | None:
  """This process's evaluated shares (one {'img_ids', 'results'} per evaluator) -> on process 0, every process's
  shares in process order; None elsewhere. A collective: every process must call it."""
  rows = _allgather_bytes(json.dumps(shares).encode())
  if jax.process_index() != 0:
    return None
  return [json.loads(r) for r in rows]


def share_from_process0(obj):
  """process 0's `obj` (JSON-serializable; NaN allowed) on every process. A collective: every process calls it."""
  payload = json.dumps(obj).encode() if jax.process_index() == 0 else b''
  return json.loads(_allgather_bytes(payload)[0])


def merge_process_results(shares: list[list[dict]], all_image_ids) -> list[dict]:
  """Per-process shares (shares[p][j]: process p's {'img_ids', 'results', ['undecodable']} of evaluator j) -> one
  merged share per evaluator. Raises ValueError unless every image of `all_image_ids` was evaluated (or found
  undecodable) by exactly one process and every result belongs to an image of its own process."""
  expected = sorted(int(i) for i in all_image_ids)
  num_evaluators = {len(s) for s in shares}
  if len(num_evaluators) != 1:
    raise ValueError(f'processes returned different numbers of evaluated entries: {sorted(num_evaluators)}')
  merged = []
  for j in range(num_evaluators.pop()):
    ids, results, owner, bad = [], {}, {}, []
    for p, process_shares in enumerate(shares):
      share = process_shares[j]
      mine = {int(i) for i in share['img_ids']}
      undecodable = [int(i) for i in share.get('undecodable', [])]
      for i in [*share['img_ids'], *undecodable]:
        if int(i) in owner:
          raise ValueError(f'image {i} was evaluated by processes {owner[int(i)]} and {p}')
        owner[int(i)] = p
      ids += [int(i) for i in share['img_ids']]
      bad += undecodable
      for t, dets in share['results'].items():
        stray = {d['image_id'] for d in dets} - mine
        if stray:
          raise ValueError(f'process {p} returned {t} results for images it did not evaluate: {sorted(stray)[:5]}')
        results.setdefault(t, []).extend(dets)
    if sorted(ids + bad) != expected:
      missing = sorted(set(expected) - set(ids) - set(bad))
      extra = sorted(set(ids + bad) - set(expected))
      raise ValueError(f'evaluated images differ from the split: missing {missing[:10]}, unexpected {extra[:10]}')
    merged.append({'img_ids': ids, 'results': results, 'undecodable': bad})
  return merged


def check_metrics(metrics) -> None:
  """Raises ValueError unless every metric is a float in [0, 100] or NaN (used by tests and after loading)."""
  groups = [metrics] + list(metrics.get('per_layer', []))
  for g in groups:
    for t in ('bbox', 'segm'):
      if t not in g:
        continue
      for name in METRIC_NAMES:
        v = g[t][name]
        if not isinstance(v, float) or not (math.isnan(v) or 0.0 <= v <= 100.0):
          raise ValueError(f'{t} {name} = {v!r} is not a percentage')
