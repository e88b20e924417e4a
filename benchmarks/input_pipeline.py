"""Images/s and host memory of the LSJ training input pipeline (grain, decode -> LSJ 1024 -> targets -> batches).

  python benchmarks/input_pipeline.py [--images DIR --annotations FILE] [--workers 0,2] [--batch-size 16]
      [--batches 12] [--config configs/dimaskdino_r50_coco.py]

Without --images, writes --num-images COCO-like images (640 x 480 JPEG, quality 90, textured so that a file is
about COCO's size, 7 polygon instances each on average as in COCO train) to a temporary directory and prepares
them. For each worker count, builds `make_train_iterator(config)` (the config's LSJ 1024 canvas, 100 GT slots,
masks at stride 4), takes one batch as warm-up (worker start, first decode), then times --batches batches.
Peak RSS is the largest sum over this process and its children, sampled every 50 ms while timing.
"""

import argparse
import os
import sys
import tempfile
import threading
import time

import numpy as np
import psutil
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dimaskdino_jax.config import load_config  # noqa: E402
from dimaskdino_jax.data import pipeline, prepare  # noqa: E402
from dimaskdino_jax.data.tfds_builder import PreparedDataset  # noqa: E402


def write_coco_like(root: str, num_images: int, seed: int = 0) -> tuple[str, str]:
  """num_images 640 x 480 JPEGs with Poisson(7) polygon instances; returns (annotation file, image dir)."""
  import json

  rng = np.random.default_rng(seed)
  img_dir = os.path.join(root, 'images')
  os.makedirs(img_dir, exist_ok=True)
  h, w = 480, 640
  yy, xx = np.mgrid[:h, :w].astype(np.float32)
  images, anns = [], []
  for i in range(num_images):
    f = rng.uniform(0.005, 0.05, 3)
    base = np.stack([127 + 100 * np.sin(f[c] * xx + f[(c + 1) % 3] * yy + c) for c in range(3)], axis=-1)
    pixels = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(pixels)
    draw = ImageDraw.Draw(im)
    for _ in range(rng.poisson(7)):
      cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(8, 150)
      t = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(5, 20)))
      rad = r * rng.uniform(0.6, 1.0, len(t))
      pts = np.stack([np.clip(cx + rad * np.cos(t), 0, w - 1), np.clip(cy + rad * np.sin(t), 0, h - 1)], axis=1)
      draw.polygon([tuple(p) for p in pts], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
      x0, y0 = pts.min(axis=0)
      x1, y1 = pts.max(axis=0)
      if x1 - x0 < 1 or y1 - y0 < 1:
        continue
      anns.append(
        {
          'id': len(anns) + 1,
          'image_id': i + 1,
          'category_id': int(rng.integers(1, 81)),
          'bbox': [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
          'area': float((x1 - x0) * (y1 - y0)),
          'iscrowd': 0,
          'segmentation': [pts.reshape(-1).round(2).tolist()],
        }
      )
    name = f'{i + 1:012d}.jpg'
    im.save(os.path.join(img_dir, name), 'JPEG', quality=90)
    images.append({'id': i + 1, 'file_name': name, 'height': h, 'width': w})
  cats = [{'id': c, 'name': f'class{c}'} for c in range(1, 81)]
  path = os.path.join(root, 'instances.json')
  with open(path, 'w') as f:
    json.dump({'images': images, 'annotations': anns, 'categories': cats}, f)
  return path, img_dir


class PeakRss:
  """Samples the RSS of this process plus all its children in a thread; `peak` in bytes."""

  def __init__(self, interval: float = 0.05):
    self.peak, self._interval, self._stop = 0, interval, threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _sample(self) -> int:
    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
      try:
        total += child.memory_info().rss
      except psutil.NoSuchProcess:
        pass
    return total

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, self._sample())
      time.sleep(self._interval)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()


def run(config, prepared, workers: int, batches: int) -> dict:
  it = pipeline.make_train_iterator(config, prepared=prepared, num_workers=workers, verbose=False)
  try:
    start = time.perf_counter()
    first = next(it)
    warmup = time.perf_counter() - start
    with PeakRss() as rss:
      start = time.perf_counter()
      for _ in range(batches):
        batch = next(it)
      elapsed = time.perf_counter() - start
  finally:
    if hasattr(it, 'close'):
      it.close()
  b = first['image'].shape[0]
  nbytes = sum(v.nbytes for v in batch.values())
  return {
    'workers': workers,
    'warmup_s': warmup,
    'images_per_s': batches * b / elapsed,
    'batch_mb': nbytes / 2**20,
    'peak_rss_gb': rss.peak / 2**30,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--images', help='image directory of a COCO-format split (default: generate)')
  parser.add_argument('--annotations', help='its instances json')
  parser.add_argument('--num-images', type=int, default=64, help='generated images')
  parser.add_argument('--config', default='configs/dimaskdino_r50_coco.py')
  parser.add_argument('--workers', default='0,2', help='comma-separated grain worker counts')
  parser.add_argument('--batch-size', type=int, default=16)
  parser.add_argument('--batches', type=int, default=12, help='timed batches per worker count')
  args = parser.parse_args()

  with tempfile.TemporaryDirectory() as tmp:
    if args.images:
      ann, img = args.annotations, args.images
    else:
      start = time.perf_counter()
      ann, img = write_coco_like(tmp, args.num_images)
      print(f'wrote {args.num_images} 640x480 JPEGs in {time.perf_counter() - start:.1f}s', flush=True)
    prepare.prepare_dataset(img, ann, 'bench', 'train', os.path.join(tmp, 'data'), verbose=False)
    prepared = PreparedDataset(os.path.join(tmp, 'data'), 'bench', 'train')
    config = load_config(args.config)
    config.model.num_classes = prepared.num_classes
    config.train.batch_size = args.batch_size
    d = config.data
    print(
      f'{len(prepared)} images; {d.train_transform} {d.image_size}, scale [{d.min_scale}, {d.max_scale}], '
      f'{d.max_instances} GT slots, masks at stride {d.mask_stride}; batch {args.batch_size}; '
      f'{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}',
      flush=True,
    )
    print('| workers | images/s | warm-up s | batch MB | peak RSS GB |')
    print('|---|---|---|---|---|')
    for workers in (int(w) for w in args.workers.split(',')):
      r = run(config, prepared, workers, args.batches)
      print(
        f'| {r["workers"]} | {r["images_per_s"]:.1f} | {r["warmup_s"]:.1f} | {r["batch_mb"]:.0f} | '
        f'{r["peak_rss_gb"]:.2f} |',
        flush=True,
      )


if __name__ == '__main__':
  main()
