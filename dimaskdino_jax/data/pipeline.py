"""grain input pipelines: training (shuffled, augmented, infinite, checkpointable) and evaluation (canvas buckets).

Training (`make_train_iterator(config)`):

  records of the prepared split (images without non-crowd annotations removed when data.filter_empty)
    -> shuffle(seed), reshuffled every epoch -> repeat forever -> TrainTransform (LSJ or resize, transforms.py;
       its rng is derived from the seed and the element's global position) -> batch (per-process batch size b)
    -> this process's shard: process p of n takes batches p, p + n, ..., so global batch k (positions
       k*n*b ... (k+1)*n*b - 1) is the processes' batches k stacked in process order, the same global batch as
       one process reading with batch n*b
    -> grain workers (data.num_workers processes; 0 = in-process threads)

  batch (numpy, static shapes), B = per-process batch, S = data.image_size, G = data.max_instances,
  s = data.mask_stride:
    image        uint8 (B, S, S, 3)
    boxes        float32 (B, G, 4)  cxcywh normalized to the padded S x S canvas
    labels       int32 (B, G)       contiguous labels, 0 where not valid
    valid        bool (B, G)        valid slots packed first
    masks        uint8 (B, G, S/s, S/s)  area average >= 0.5 per stride cell (absent for a detection-only dataset)
    num_dropped  int32 (B,)         instances beyond G that were dropped (the G largest are kept)
    record_error bool (B,)          a record that could not be decoded became a blank example (and was logged)

  Before the first batch, `check_dataset(config, prepared)` fails with a message naming both values when
  config.model.num_classes differs from the dataset's number of categories, or when a detection-only dataset
  (no segmentation in its annotation file) meets config.loss.mask_losses = True; then a summary by reason of what
  was filtered (empty images), skipped and repaired at prepare time, and of the images with more than
  max_instances instances, is printed (`train_summary`).

  The iterator is a grain DatasetIterator: `state = it.get_state()` (a small JSON-able dict) and
  `it.set_state(state)` on a fresh iterator of the same config resume exactly (same next batches). The stream
  is a function of (seed, shard) only, and with workers of (seed, shard, num_workers).

Evaluation (`EvalLoader(config)`): every image of the split (or the first max_images), in record order,
test-resized (shortest side data.test_short_edge, longest <= data.test_max_size) and placed top-left in the
smallest canvas of data.eval_canvases that holds it (mode 'buckets'), or in its own size rounded up to a
multiple of size_divisibility (mode 'exact'). Batches hold one canvas each; each canvas group is padded with
filler entries (is_padding True) to a multiple of batch_size x shard_count, so every process runs the same
sequence of batch shapes.

  batch: image uint8 (B, Hc, Wc, 3), image_id int64 (B,) (-1 for fillers), image_hw int32 (B, 2) resized size
  inside the canvas, orig_hw int32 (B, 2) original size, is_padding bool (B,), record_error bool (B,) (an
  undecodable record: a filler that keeps its image_id, see transforms.EvalTransform)
"""

import math

import grain
import numpy as np
from absl import flags as absl_flags

from dimaskdino_jax.data.coco_format import DatasetError
from dimaskdino_jax.data.tfds_builder import PreparedDataset
from dimaskdino_jax.data.transforms import EvalTransform, TrainTransform, choose_canvas, exact_canvas, shortest_edge_hw

_MAX_SEED = 2**32 - 1


class _Subset:
  """Records `indices` of a random-access source (picklable, for grain workers)."""

  def __init__(self, source, indices):
    self._source = source
    self._indices = np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i):
    return self._source[int(self._indices[i])]


def _read_options(num_workers: int) -> grain.ReadOptions:
  # Small buffers: an LSJ batch of 16 is ~150 MB. In-process (num_workers=0) two threads overlap decoding.
  return grain.ReadOptions(num_threads=2 if num_workers == 0 else 1, prefetch_buffer_size=2)


def _finish(dataset: grain.MapDataset, num_workers: int) -> grain.IterDataset:
  iter_dataset = dataset.to_iter_dataset(_read_options(num_workers))
  if num_workers > 0:
    if not absl_flags.FLAGS.is_parsed():  # grain's worker processes read absl flags; outside app.run: defaults
      absl_flags.FLAGS.mark_as_parsed()
    iter_dataset = iter_dataset.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2)
    )
  return iter_dataset


def check_dataset(config, prepared: PreparedDataset, *, training: bool = True) -> None:
  """Raises DatasetError when the config cannot be used with the prepared dataset (see the module docstring)."""
  n = int(config.model.num_classes)
  if n != prepared.num_classes:
    names = ', '.join(prepared.category_names[:10]) + (', ...' if prepared.num_classes > 10 else '')
    raise DatasetError(
      f'config.model.num_classes = {n} but the prepared dataset {prepared.path} has {prepared.num_classes} '
      f'categories ({names}); set --config.model.num_classes={prepared.num_classes} or point config.data at the '
      'dataset this config is for'
    )
  box_init = str(config.model.decoder.get('box_init', 'none'))
  if training and not prepared.has_masks and (bool(config.loss.mask_losses) or box_init != 'none'):
    problems = []
    if bool(config.loss.mask_losses):
      problems.append('config.loss.mask_losses is True (there are no masks to learn)')
    if box_init != 'none':
      problems.append(f'config.model.decoder.box_init is {box_init!r} (anchors from masks that nothing trains)')
    raise DatasetError(
      f'{prepared.path} is detection-only (its annotation file has no segmentation) but {" and ".join(problems)}; '
      'set --config.loss.mask_losses=False --config.model.decoder.box_init=none: boxes are then trained without '
      'masks and evaluated as bbox only'
    )


def _counts_text(counts: dict) -> str:
  return ', '.join(f'{reason}: {n}' for reason, n in sorted(counts.items())) or 'none'


def train_summary(config, prepared: PreparedDataset, indices) -> str:
  """What the training pipeline uses and what it leaves out, by reason (printed by make_train_dataset)."""
  data_config = config.data
  max_instances = int(data_config.max_instances)
  over = int(np.sum(prepared.index['num_noncrowd'][indices] > max_instances))
  meta_skip = prepared.metadata.get('skipped', {})
  meta_fix = prepared.metadata.get('repaired', {})
  kind = 'boxes and masks' if prepared.has_masks else 'boxes only (detection-only)'
  lines = [
    f'data {prepared.name}/{prepared.split} ({prepared.path}): {len(prepared)} images, {len(indices)} used for '
    f'training ({kind}, {prepared.num_classes} classes)',
    f'  filtered: {len(prepared) - len(indices)} without non-crowd annotations '
    f'(data.filter_empty={data_config.filter_empty})',
  ]
  for verb, meta in (('skipped', meta_skip), ('repaired', meta_fix)):
    for what in ('images', 'annotations'):
      counts = meta.get(what, {}).get('counts', {})
      lines.append(f'  {verb} {what} at prepare: {sum(counts.values())} ({_counts_text(counts)})')
  lines.append(
    f'  {over} images have more than data.max_instances={max_instances} non-crowd instances: each keeps its '
    f'{max_instances} largest, '
    "batch['num_dropped'] counts the rest; undecodable records become blank examples counted in "
    "batch['record_error']"
  )
  return '\n'.join(lines)


def train_indices(prepared: PreparedDataset, filter_empty: bool) -> np.ndarray:
  """Record indices used for training: all, or those with >= 1 non-crowd annotation."""
  if filter_empty:
    return np.nonzero(prepared.index['num_noncrowd'] > 0)[0]
  return np.arange(len(prepared))


def make_train_dataset(
  config,
  *,
  seed: int | None = None,
  batch_size: int | None = None,
  shard_index: int = 0,
  shard_count: int = 1,
  prepared: PreparedDataset | None = None,
  num_workers: int | None = None,
  verbose: bool = True,
) -> grain.IterDataset:
  """The training pipeline as a grain IterDataset (see the module docstring).

  seed: default config.seed. batch_size: per-process batch, default config.train.batch_size // shard_count.
  shard_index / shard_count: this process and the number of processes (jax.process_index(), process_count()).
  prepared: default PreparedDataset(config.data.data_dir, config.data.name, config.data.train_split).
  """
  data_config = config.data
  seed = int(config.seed if seed is None else seed) % _MAX_SEED
  if batch_size is None:
    if config.train.batch_size % shard_count:
      raise ValueError(f'train.batch_size {config.train.batch_size} is not divisible by {shard_count} processes')
    batch_size = config.train.batch_size // shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'shard_index {shard_index} not in [0, {shard_count})')
  prepared = prepared or PreparedDataset(data_config.data_dir, data_config.name, data_config.train_split)
  check_dataset(config, prepared)
  indices = train_indices(prepared, bool(data_config.filter_empty))
  if len(indices) == 0:
    raise ValueError(
      f'{prepared.path}: no training images with annotations (data.filter_empty={data_config.filter_empty})'
    )
  if verbose and shard_index == 0:
    print(train_summary(config, prepared, indices), flush=True)
  dataset = grain.MapDataset.source(_Subset(prepared.data_source, indices))
  dataset = dataset.shuffle(seed=seed).repeat(None)
  transform = TrainTransform.from_config(config, with_masks=prepared.has_masks)
  dataset = dataset.random_map(transform, seed=(seed + 1) % _MAX_SEED)
  # Process p of n takes the p-th block of each global batch: its rows, stacked in process order, are exactly the
  # global batch of a single-process run (so results do not depend on the number of hosts).
  dataset = dataset.batch(batch_size, drop_remainder=True)
  if shard_count > 1:
    dataset = dataset[shard_index::shard_count]
  return _finish(dataset, int(data_config.num_workers if num_workers is None else num_workers))


def make_train_iterator(config, **kwargs) -> grain.DatasetIterator:
  """iter(make_train_dataset(config, **kwargs)): yields batches; has get_state() / set_state(state)."""
  return iter(make_train_dataset(config, **kwargs))


class _EvalSource:
  """Entry k of an eval plan -> (record or None for a filler, canvas)."""

  def __init__(self, source, record_indices, canvases):
    self._source = source
    self._record_indices = np.asarray(record_indices, np.int64)
    self._canvases = [tuple(c) for c in canvases]

  def __len__(self) -> int:
    return len(self._record_indices)

  def __getitem__(self, k):
    i = int(self._record_indices[k])
    return (None if i < 0 else self._source[i]), self._canvases[k]


class _EvalMap(grain.transforms.Map):
  def __init__(self, transform: EvalTransform):
    self._transform = transform

  def map(self, element):
    record, canvas = element
    return self._transform(record, canvas)


class EvalLoader:
  """Evaluation batches grouped by canvas (see the module docstring); iterate it once per evaluation.

  Attributes: prepared (PreparedDataset: gt_json_path, coco(), label_map, label_to_category_id), image_ids
  (int64, the real images this process evaluates, in batch order), batch_canvases (one (H, W) per batch),
  canvases (the distinct canvases used), num_images. len(loader) = number of batches.
  """

  def __init__(
    self,
    config,
    *,
    split: str | None = None,
    mode: str = 'buckets',
    batch_size: int | None = None,
    max_images: int | None = None,
    shard_index: int = 0,
    shard_count: int = 1,
    prepared: PreparedDataset | None = None,
    num_workers: int | None = None,
    pad_value=None,
  ):
    data_config = config.data
    if mode not in ('buckets', 'exact'):
      raise ValueError(f"eval mode {mode!r}: choose 'buckets' (data.eval_canvases) or 'exact'")
    self.prepared = prepared or PreparedDataset(data_config.data_dir, data_config.name, split or data_config.val_split)
    check_dataset(config, self.prepared, training=False)
    self.batch_size = int(batch_size or config.eval.batch_size)
    if max_images is None:
      max_images = int(config.eval.get('max_images', 0))
    self.num_workers = int(data_config.num_workers if num_workers is None else num_workers)
    if pad_value is None:  # ~0 after normalization, like the official pad-after-normalize
      pad_value = np.round(np.asarray(config.model.get('pixel_mean', (0.0, 0.0, 0.0)))).astype(np.uint8)
    self.transform = EvalTransform(int(data_config.test_short_edge), int(data_config.test_max_size), pad_value)
    divisibility = int(config.model.get('size_divisibility', 32))

    index = self.prepared.index
    n = len(self.prepared) if not max_images else min(max_images, len(self.prepared))
    groups: dict[tuple[int, int], list[int]] = {}
    for i in range(n):
      hw = shortest_edge_hw(
        int(index['height'][i]), int(index['width'][i]), data_config.test_short_edge, data_config.test_max_size
      )
      canvas = choose_canvas(hw, data_config.eval_canvases) if mode == 'buckets' else exact_canvas(hw, divisibility)
      groups.setdefault(canvas, []).append(i)
    if mode == 'buckets':
      order = [c for c in dict.fromkeys(tuple(int(v) for v in c) for c in data_config.eval_canvases) if c in groups]
    else:
      order = sorted(groups)
    record_indices, canvases = [], []
    chunk = self.batch_size * shard_count
    for canvas in order:
      members = groups[canvas]
      members = members + [-1] * (math.ceil(len(members) / chunk) * chunk - len(members))
      mine = members[shard_index::shard_count]
      record_indices += mine
      canvases += [canvas] * len(mine)
    self.canvases = order
    self.batch_canvases = canvases[:: self.batch_size]
    self._record_indices = np.asarray(record_indices, np.int64)
    real = self._record_indices[self._record_indices >= 0]
    self.image_ids = index['image_id'][real]
    self.num_images = len(real)
    self._source = _EvalSource(self.prepared.data_source, record_indices, canvases)

  def __len__(self) -> int:
    return len(self.batch_canvases)

  def dataset(self) -> grain.IterDataset:
    dataset = grain.MapDataset.source(self._source).map(_EvalMap(self.transform)).batch(self.batch_size)
    return _finish(dataset, self.num_workers)

  def __iter__(self):
    return iter(self.dataset())
