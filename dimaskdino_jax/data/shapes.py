"""A synthetic instance-segmentation dataset in COCO format: filled circles, squares and triangles.

`write_shapes_dataset(root)` writes

  root/train/000001.jpg ...            images (every 4th one a PNG), sizes near image_size, often non-square
  root/val/...
  root/annotations/instances_train.json, instances_val.json

Three categories with deliberately non-contiguous ids (1 circle, 3 square, 7 triangle). Each image has a
textured background (random base colour, linear gradient, stripes, noise) and 1-6 shapes of random colour and
size (circumradius log-uniform from MIN_RADIUS = 8 px to 0.45 x the short side, so COCO small, medium and large
all occur; 8 px keeps every object at least two cells wide on the 1/4-resolution mask map of a 128 px canvas).
Shapes are painted in order, so later shapes occlude earlier ones: every mask, box and area describes the
visible part only, and shapes hidden (almost) entirely (< 4 visible pixels) are dropped. An unoccluded shape
is annotated with its polygon (60%) or an RLE; an occluded one with an RLE of its visible part (pycocotools
compressed RLE, `counts` as str). Every 8th image (index % 8 == 5) also has a crowd region (`iscrowd=1`, RLE):
a cluster of small shapes of one class; every 25th image (index % 25 == 3) is empty (no shapes).

The masks are exactly what pycocotools rasterizes from each shape's polygon (a circle is a 28-gon), and the
image is painted from those same masks, so the ground truth matches the pixels. Everything is a function of
(seed, split, image index): the same seed gives byte-identical json and images.

CLI: `python -m dimaskdino_jax.data.shapes --out DIR [--seed 0 --num-train 2000 --num-val 200 --image-size 128]`.
"""

import argparse
import io
import json
import os
import time

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

CATEGORIES = (
  {'id': 1, 'name': 'circle', 'supercategory': 'shape'},
  {'id': 3, 'name': 'square', 'supercategory': 'shape'},
  {'id': 7, 'name': 'triangle', 'supercategory': 'shape'},
)
_SPLIT_KEYS = {'train': 0, 'val': 1}
_MIN_VISIBLE_PIXELS = 4
_CIRCLE_VERTICES = 28


def _polygon(kind: str, cx: float, cy: float, radius: float, angle: float) -> list[float]:
  """Vertices (x0, y0, x1, y1, ...) of a shape with circumradius `radius`, rotated by angle (radians)."""
  n = {'circle': _CIRCLE_VERTICES, 'square': 4, 'triangle': 3}[kind]
  angles = angle + 2 * np.pi * np.arange(n) / n
  return np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], axis=1).reshape(-1).round(2).tolist()


def _rasterize(poly: list[float], h: int, w: int) -> np.ndarray:
  rle = mask_util.frPyObjects([poly], h, w)
  return mask_util.decode(rle)[:, :, 0].astype(bool)


def _random_color(rng: np.random.Generator, avoid: np.ndarray) -> np.ndarray:
  """A colour at L1 distance >= 150 from `avoid` (the background base colour)."""
  for _ in range(20):
    color = rng.integers(0, 256, 3)
    if np.abs(color - avoid).sum() >= 150:
      return color
  return 255 - avoid


def _background(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
  base = rng.integers(40, 216, 3).astype(np.float32)
  yy = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
  xx = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
  gx, gy = rng.uniform(-1, 1, 2)
  grad = (gx * xx + gy * yy)[..., None] * rng.uniform(0, 30, 3).astype(np.float32)
  freq, phase, theta = rng.uniform(2, 12), rng.uniform(0, 2 * np.pi), rng.uniform(0, np.pi)
  stripes = np.sin(freq * (np.cos(theta) * xx + np.sin(theta) * yy) * np.pi + phase)[..., None] * rng.uniform(0, 15)
  return base + grad + stripes, base


MIN_RADIUS = 8.0  # px: smallest circumradius of a (non-crowd) shape


def _make_image(rng: np.random.Generator, index: int, image_size: int):
  """One image: (uint8 image (H, W, 3), list of (category index, visible mask, full mask, polygon, is_crowd))."""
  if rng.random() < 0.3:
    h = w = int(round(image_size * rng.uniform(0.8, 1.2)))
  else:
    h, w = (int(round(image_size * s)) for s in rng.uniform(0.7, 1.25, 2))
  image, base = _background(rng, h, w)
  short = min(h, w)
  items = []  # (cat index, full mask, polygon or None, is_crowd), in paint order
  num_shapes = 0 if index % 25 == 3 else int(rng.integers(1, 7))
  crowd_at = int(rng.integers(0, num_shapes + 1)) if index % 8 == 5 else -1
  for k in range(num_shapes + 1):
    if k == crowd_at:  # a crowd region: a cluster of 3-7 small shapes of one class, one annotation
      cat = int(rng.integers(0, 3))
      kind = CATEGORIES[cat]['name']
      region = rng.uniform(0.25, 0.4) * short
      x0, y0 = rng.uniform(0, w - region), rng.uniform(0, h - region)
      union = np.zeros((h, w), bool)
      for _ in range(int(rng.integers(3, 8))):
        radius = rng.uniform(2.0, 5.0)
        cx, cy = x0 + rng.uniform(radius, region - radius), y0 + rng.uniform(radius, region - radius)
        union |= _rasterize(_polygon(kind, cx, cy, radius, rng.uniform(0, 2 * np.pi)), h, w)
      items.append((cat, union, None, True))
    if k == num_shapes:
      break
    cat = int(rng.integers(0, 3))
    kind = CATEGORIES[cat]['name']
    radius = float(np.exp(rng.uniform(np.log(MIN_RADIUS), np.log(0.45 * short))))
    cx, cy = rng.uniform(radius, w - radius), rng.uniform(radius, h - radius)
    angle = 0.0 if (kind == 'square' and rng.random() < 0.5) else rng.uniform(0, 2 * np.pi)
    poly = _polygon(kind, cx, cy, radius, angle)
    items.append((cat, _rasterize(poly, h, w), poly, False))

  for _, mask, _, _ in items:
    image[mask] = _random_color(rng, base)
  image += 6.0 * rng.standard_normal(image.shape, dtype=np.float32)
  image = np.clip(image, 0, 255).round().astype(np.uint8)

  occupied = np.zeros((h, w), bool)
  shapes = []
  for cat, mask, poly, is_crowd in reversed(items):
    visible = mask & ~occupied
    occupied |= mask
    if visible.sum() < _MIN_VISIBLE_PIXELS:
      continue
    use_poly = poly is not None and not (mask & ~visible).any() and rng.random() < 0.6
    shapes.append((cat, visible, poly if use_poly else None, is_crowd))
  return image, shapes[::-1]


def _annotation(ann_id: int, image_id: int, cat: int, visible: np.ndarray, poly, is_crowd: bool) -> dict:
  rle = mask_util.encode(np.asfortranarray(visible.astype(np.uint8)))
  bbox = [round(float(v), 2) for v in mask_util.toBbox(rle)]
  segmentation = (
    [poly] if poly is not None else {'size': [int(s) for s in rle['size']], 'counts': rle['counts'].decode()}
  )
  return {
    'id': ann_id,
    'image_id': image_id,
    'category_id': CATEGORIES[cat]['id'],
    'segmentation': segmentation,
    'area': float(mask_util.area(rle)),
    'bbox': bbox,
    'iscrowd': int(is_crowd),
  }


def _write_split(root: str, split: str, num_images: int, seed: int, image_size: int) -> dict:
  image_dir = os.path.join(root, split)
  os.makedirs(image_dir, exist_ok=True)
  images, annotations = [], []
  for i in range(num_images):
    rng = np.random.default_rng([seed, _SPLIT_KEYS.get(split, 2), i])
    image, shapes = _make_image(rng, i, image_size)
    image_id = i + 1
    ext = 'png' if i % 4 == 3 else 'jpg'
    file_name = f'{image_id:06d}.{ext}'
    buf = io.BytesIO()
    if ext == 'png':
      Image.fromarray(image).save(buf, format='PNG')
    else:
      Image.fromarray(image).save(buf, format='JPEG', quality=92)
    with open(os.path.join(image_dir, file_name), 'wb') as f:
      f.write(buf.getvalue())
    images.append({'id': image_id, 'file_name': file_name, 'height': image.shape[0], 'width': image.shape[1]})
    for cat, visible, poly, is_crowd in shapes:
      annotations.append(_annotation(len(annotations) + 1, image_id, cat, visible, poly, is_crowd))
  return {
    'info': {'description': f'synthetic shapes, seed {seed}, split {split}', 'version': '1.0'},
    'licenses': [],
    'images': images,
    'annotations': annotations,
    'categories': [dict(c) for c in CATEGORIES],
  }


def write_shapes_dataset(
  root: str, seed: int = 0, num_train: int = 2000, num_val: int = 200, image_size: int = 128
) -> dict[str, str]:
  """Writes the dataset under `root` (see the module docstring); returns {split: annotation json path}."""
  os.makedirs(os.path.join(root, 'annotations'), exist_ok=True)
  paths = {}
  for split, n in (('train', num_train), ('val', num_val)):
    coco = _write_split(root, split, n, seed, image_size)
    path = os.path.join(root, 'annotations', f'instances_{split}.json')
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(coco, f)
    os.replace(tmp, path)
    paths[split] = path
  return paths


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='output directory')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--num-train', type=int, default=2000)
  parser.add_argument('--num-val', type=int, default=200)
  parser.add_argument('--image-size', type=int, default=128)
  args = parser.parse_args(argv)
  start = time.time()
  paths = write_shapes_dataset(args.out, args.seed, args.num_train, args.num_val, args.image_size)
  print(f'wrote {args.num_train} train + {args.num_val} val images to {args.out} in {time.time() - start:.1f}s')
  for split, path in paths.items():
    print(f'  {split}: {path}')


if __name__ == '__main__':
  main()
