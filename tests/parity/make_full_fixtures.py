r"""Regenerate tests/parity/fixtures_full from the official DI-MaskDINO code at full size (run by hand; the tests never
run it). About 4 minutes and 6 GiB on 2 CPU cores at --short-edge 800.

  python -m tests.parity.make_full_fixtures --official /path/to/DI-MaskDINO --detectron2 /path/to/detectron2 \
      [--short-edge 800 --max-size 1333] [--out tests/parity/fixtures_full]

The official R50 COCO model (fixture_io.FULL: 52,286,232 parameters) with weights drawn from fixture_io.FULL_SEED by
fixture_io.draw_state_dict, run on scikit-image's photographs (fixture_io.PHOTOS) after the official test-time
pipeline (ResizeShortestEdge(short_edge, max_size), normalize, pad to a multiple of 32): once in one batch and once
one image at a time. The official code is loaded as make_fixtures.py does (its stand-ins, its `run` with the stage
hooks). Nothing of the weights is written: only the key list (weights.json) and the outputs.

What it writes into --out/<short_edge>/:
  weights.json  the official keys, shapes and shared-module aliases in drawing order, the seed
  batch.npz     stages of the batched run (fixture_io.summarize: big tensors as samples + statistics), the selected
                indices and scores of every official top-k, and the final detections whole (boxes, scores, labels,
                masks at the original size, bit-packed)
  single_<i>.npz  the same for photograph i run alone
  meta.json     versions, commits, sizes, canvases, timings, threads
"""

import argparse
import json
import os
import sys
import time
import warnings

import numpy as np
import torch

from tests.parity import make_fixtures as mf
from tests.parity.fixture_io import FULL, FULL_SEED, PHOTOS, draw_state_dict, photos, summarize

# Stages whose official value is kept whole when small and summarized otherwise (see fixture_io.summarize).
FINAL_KEYS = ('scores', 'labels', 'boxes', 'masks', 'masks_shape')


def weight_entries(model):
  """[(key, shape, is_buffer)] in drawing order and {duplicate key: drawn key} for shared modules."""
  entries, drawn = [], {}
  keys = model.state_dict().keys()  # without the non-persistent pixel_mean / pixel_std
  for name, p in model.named_parameters():  # shared modules are listed once
    entries.append((name, list(p.shape), False))
    drawn[p.data_ptr()] = name
  for name, b in model.named_buffers():
    if name not in keys:
      continue
    entries.append((name, list(b.shape), True))
    drawn[b.data_ptr()] = name
  aliases = {}
  for name, t in model.state_dict(keep_vars=True).items():
    key = drawn[t.data_ptr()]
    if key != name:
      aliases[name] = key
  return entries, aliases


def canvas_of(hws, divisibility=32):
  h = max(hw[0] for hw in hws)
  w = max(hw[1] for hw in hws)
  return -(-h // divisibility) * divisibility, -(-w // divisibility) * divisibility


class TopkLog:
  """Records every torch.topk / Tensor.topk call of the official forward: (k, dim, values, indices)."""

  def __init__(self):
    self.calls = []

  def __enter__(self):
    self._fn, self._method = torch.topk, torch.Tensor.topk
    log, fn = self.calls, self._fn

    def topk(x, k, dim=-1, largest=True, sorted=True):
      out = fn(x, k, dim=dim, largest=largest, sorted=sorted)
      log.append((k, dim, out[0].detach().numpy().copy(), out[1].numpy().copy()))
      return out

    torch.topk = topk
    torch.Tensor.topk = lambda x, k, dim=-1, largest=True, sorted=True: topk(x, k, dim, largest, sorted)
    return self

  def __exit__(self, *exc):
    torch.topk, torch.Tensor.topk = self._fn, self._method


def run_official(model, images, specs):
  """make_fixtures.run on images placed top-left in a canvas, plus the official top-k selections of the eval pass."""
  canvas = canvas_of([s['image_hw'] for s in specs])
  batch = np.zeros((len(images), *canvas, 3), np.uint8)  # (B, H, W, 3)
  for b, img in zip(batch, images):
    b[: img.shape[0], : img.shape[1]] = img
  with TopkLog() as log:
    stages = mf.run(model, batch, specs)
  n = len(images)
  # Eval pass: k1 selection (dim 1), k2 selection (dim 1), BATO guiding tokens (dim 0, (G, B)), then one top-100 per
  # image; the training-mode pass repeats the first three.
  calls = log.calls[: 3 + n]
  ks = [c[0] for c in calls]
  if ks != [FULL['k1'], FULL['k2'], FULL['guiding_tokens']] + [FULL['detections_per_image']] * n:
    raise AssertionError(f'unexpected official top-k calls {ks}')
  out = {}
  for name, (_k, dim, values, idx) in zip(('enc_topk', 'di_topk', 'bato_topk'), calls[:3]):
    if dim == 0:
      values, idx = values.T, idx.T  # (B, k)
    out[f'{name}_index'], out[f'{name}_values'] = idx.astype(np.int64), values
  return stages, out, canvas


def pack(stages, selections, n):
  out = {}
  for name, value in stages.items():
    if name.startswith('final_') or name == 'images':
      continue
    out.update(summarize(name, value, FULL_SEED))
  out.update(selections)
  for i in range(n):
    for key in FINAL_KEYS:
      out[f'final_{i}_{key}'] = stages[f'final_{i}_{key}']
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--official', required=True, help='DI-MaskDINO checkout (holds dimaskdino/)')
  parser.add_argument('--detectron2', required=True, help='detectron2 checkout (holds detectron2/)')
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'fixtures_full'))
  parser.add_argument('--short-edge', type=int, default=800)
  parser.add_argument('--max-size', type=int, default=1333)
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--official-commit', default=None)
  parser.add_argument('--detectron2-commit', default=None)
  args = parser.parse_args(argv)
  warnings.filterwarnings('ignore', category=FutureWarning)
  torch.set_num_threads(args.threads)
  out = os.path.join(args.out, str(args.short_edge))
  os.makedirs(out, exist_ok=True)
  t0 = time.time()
  resnet, head, meta = mf.install_shims(os.path.abspath(args.official), os.path.abspath(args.detectron2))
  model = mf.build_official(resnet, head, meta, FULL)
  entries, aliases = weight_entries(model)
  sd = draw_state_dict(entries, aliases, FULL_SEED)
  missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
  n_params = sum(p.numel() for p in model.parameters())
  print(f'official model: {n_params:,} parameters, {len(sd)} state_dict keys ({time.time() - t0:.0f} s)', flush=True)
  with open(os.path.join(out, 'weights.json'), 'w') as f:
    json.dump({'seed': FULL_SEED, 'entries': entries, 'aliases': aliases}, f)

  images, orig = photos(PHOTOS, args.short_edge, args.max_size)
  specs = [dict(image_hw=img.shape[:2], orig_hw=o) for img, o in zip(images, orig)]
  timings, canvases = {}, {}
  t = time.time()
  stages, sel, canvases['batch'] = run_official(model, images, specs)
  timings['batch'] = time.time() - t
  np.savez_compressed(os.path.join(out, 'batch.npz'), **pack(stages, sel, len(images)))
  print(f'batch of {len(images)} on {canvases["batch"]}: {timings["batch"]:.0f} s', flush=True)
  del stages
  for i, (img, spec) in enumerate(zip(images, specs)):
    t = time.time()
    stages, sel, canvases[f'single_{i}'] = run_official(model, [img], [spec])
    timings[f'single_{i}'] = time.time() - t
    np.savez_compressed(os.path.join(out, f'single_{i}.npz'), **pack(stages, sel, 1))
    print(f'{PHOTOS[i]} alone on {canvases[f"single_{i}"]}: {timings[f"single_{i}"]:.0f} s', flush=True)
    del stages
  import skimage

  meta_info = {
    'official': 'github.com/CQU-ADHRI-Lab/DI-MaskDINO',
    'official_commit': args.official_commit or mf._git(args.official),
    'detectron2_commit': args.detectron2_commit or mf._git(args.detectron2),
    'torch': torch.__version__,
    'numpy': np.__version__,
    'scikit-image': skimage.__version__,
    'python': sys.version.split()[0],
    'seed': FULL_SEED,
    'threads': args.threads,
    'config': FULL,
    'parameters': n_params,
    'photos': list(PHOTOS),
    'short_edge': args.short_edge,
    'max_size': args.max_size,
    'image_hw': [list(s['image_hw']) for s in specs],
    'orig_hw': [list(s['orig_hw']) for s in specs],
    'canvases': {k: list(v) for k, v in canvases.items()},
    'seconds': {k: round(v, 1) for k, v in timings.items()},
  }
  with open(os.path.join(out, 'meta.json'), 'w') as f:
    json.dump(meta_info, f, indent=2, sort_keys=True)
  sizes = {n: os.path.getsize(os.path.join(out, n)) for n in sorted(os.listdir(out))}
  print(f'wrote {out}: {sizes} in {time.time() - t0:.0f} s')


if __name__ == '__main__':
  main()
