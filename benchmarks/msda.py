"""Times multi-scale deformable attention: forward and forward+backward, median ms per implementation.

  python benchmarks/msda.py --json msda.json [--sizes encoder,decoder,shapes] [--repeats N] [--impls ...]
      [--torch-device cuda]

Sizes (fp32, 4 levels x 4 points):
  encoder: 1 image, levels 128^2/64^2/32^2/16^2 = 21,760 tokens, 8 heads x 32 channels, queries = all tokens;
  decoder: the same value, 400 queries;
  shapes:  the CPU demo's encoder (configs/shapes.py): 8 images, levels 16^2/8^2/4^2/2^2 = 340 tokens, 4 heads x
           16 channels, queries = all tokens.
Implementations: `xla`, `dense` and `reference` (kernels.ms_deform_attn), `pallas` (GPU only), `torch`
(PyTorch pure reference with F.grid_sample per level, like Deformable DETR's ms_deform_attn_core_pytorch; only
when torch is importable; --torch-device cuda runs it on the GPU). Also prints a memory-traffic floor per size from
a measured copy bandwidth: on a GPU backend the device's (a jitted a + 1 over 1 GiB, read + write), else the host's
(a numpy copy). Writes {size: {impl: {"fwd_ms": .., "fwdbwd_ms": ..}}} to --json, with the floor under the key
"floor" and the bandwidth under the top-level key "bandwidth" ({"gbs", "source"}); an implementation that fails
gets {"error": message} and the others still run.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dimaskdino_jax import runtime  # noqa: E402

# Must be set before jax is imported (docs/jax_notes.md: 14x on this op).
os.environ['XLA_FLAGS'] = runtime.with_cpu_flags(os.environ.get('XLA_FLAGS', ''))

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import kernels.ms_deform_attn as msda  # noqa: E402
from kernels.ms_deform_attn import torch_reference  # noqa: E402

POINTS = 4
COCO_SHAPES = ((128, 128), (64, 64), (32, 32), (16, 16))
DEMO_SHAPES = ((16, 16), (8, 8), (4, 4), (2, 2))
# size -> (batch, level shapes, heads, channels per head, queries)
SIZES = {
  'encoder': (1, COCO_SHAPES, 8, 32, sum(h * w for h, w in COCO_SHAPES)),
  'decoder': (1, COCO_SHAPES, 8, 32, 400),
  'shapes': (8, DEMO_SHAPES, 4, 16, sum(h * w for h, w in DEMO_SHAPES)),
}


def make_inputs(size, seed=0):
  n, shapes, heads, channels, lq = SIZES[size]
  rng = np.random.default_rng(seed)
  s = sum(h * w for h, w in shapes)
  nl = len(shapes)
  value = rng.normal(size=(n, s, heads, channels)).astype(np.float32)
  # Locations spread over the map, about 17% of points with a coordinate slightly outside [0, 1].
  loc = rng.uniform(-0.05, 1.05, size=(n, lq, heads, nl, POINTS, 2)).astype(np.float32)
  logits = rng.normal(size=(n, lq, heads, nl * POINTS))
  attn = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).reshape(n, lq, heads, nl, POINTS)
  cot = rng.normal(size=(n, lq, heads * channels)).astype(np.float32)
  return value, loc, attn.astype(np.float32), cot


def _median_ms(fn, repeats):
  fn()  # compile / warm up
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return 1000.0 * float(np.median(times))


def time_jax(impl, shapes, inputs, repeats):
  value, loc, attn, cot = (jnp.asarray(x) for x in inputs)
  starts = msda.normalize_shapes(shapes)[1]

  def f(v, lc, a):
    return msda.ms_deform_attn(v, shapes, starts, lc, a, impl=impl)

  fwd = jax.jit(f)
  fwdbwd = jax.jit(jax.grad(lambda v, lc, a: jnp.sum(f(v, lc, a) * cot), argnums=(0, 1, 2)))
  return {
    'fwd_ms': _median_ms(lambda: jax.block_until_ready(fwd(value, loc, attn)), repeats),
    'fwdbwd_ms': _median_ms(lambda: jax.block_until_ready(fwdbwd(value, loc, attn)), repeats),
  }


def time_torch(shapes, inputs, repeats, device='cpu'):
  import torch

  torch.set_num_threads(os.cpu_count() or 1)
  value, loc, attn, cot = (torch.from_numpy(np.asarray(x)).to(device) for x in inputs)
  sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)

  def fwd():
    torch_reference.ms_deform_attn_torch(value, shapes, loc, attn)
    sync()

  with torch.no_grad():
    fwd_ms = _median_ms(fwd, repeats)
  v, lc, a = (x.clone().requires_grad_(True) for x in (value, loc, attn))

  def fwdbwd():
    for x in (v, lc, a):
      x.grad = None
    (torch_reference.ms_deform_attn_torch(v, shapes, lc, a) * cot).sum().backward()
    sync()

  return {'fwd_ms': fwd_ms, 'fwdbwd_ms': _median_ms(fwdbwd, repeats)}


def copy_bandwidth_gbs():
  """Read + write bandwidth of a numpy copy of a 400 MB array, GB/s (best of 5)."""
  a = np.ones(100_000_000, np.float32)
  b = np.empty_like(a)
  best = float('inf')
  for _ in range(5):
    t = time.perf_counter()
    np.copyto(b, a)
    best = min(best, time.perf_counter() - t)
  return 2 * a.nbytes / best / 1e9


def device_copy_bandwidth_gbs():
  """Read + write bandwidth of a jitted a + 1 over a 1 GiB float32 array on the default device, GB/s (best of 5)."""
  a = jnp.ones(2**28, jnp.float32)
  f = jax.jit(lambda x: x + 1)
  jax.block_until_ready(f(a))
  best = float('inf')
  for _ in range(5):
    t = time.perf_counter()
    jax.block_until_ready(f(a))
    best = min(best, time.perf_counter() - t)
  return 2 * a.nbytes / best / 1e9


def floor_ms(size, bandwidth_gbs):
  """Memory-traffic floor: every sample point touches 4 corner rows of D floats (forward: read them once;
  forward+backward: read them in the forward and the backward, and read+write them in the value-gradient
  accumulation), plus locations, weights, outputs and their gradients once each."""
  n, shapes, heads, channels, lq = SIZES[size]
  tokens = sum(h * w for h, w in shapes)
  samples = n * lq * heads * len(shapes) * POINTS
  corners = samples * 4 * channels * 4  # bytes
  small = samples * 3 * 4 + n * lq * heads * channels * 4  # locations + weights, output
  fwd = corners + small
  fwdbwd = 4 * corners + 2 * small + 2 * small + 2 * n * tokens * heads * channels * 4
  return 1000 * fwd / 1e9 / bandwidth_gbs, 1000 * fwdbwd / 1e9 / bandwidth_gbs


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--json', required=True, help='where to write the figures')
  parser.add_argument('--sizes', default='encoder,decoder', help='comma-separated subset of: ' + ','.join(SIZES))
  parser.add_argument('--repeats', type=int, default=5, help='timed runs per figure (after one warm-up)')
  parser.add_argument('--impls', default='xla,dense,reference,pallas,torch', help='comma-separated implementations')
  parser.add_argument('--torch-device', default='cpu', help="device of the torch reference ('cpu', 'cuda')")
  args = parser.parse_args()
  sizes = [s for s in args.sizes.split(',') if s]
  for s in sizes:
    if s not in SIZES:
      parser.error(f'--sizes: unknown size {s!r}; choose from {sorted(SIZES)}')
  impls = [i for i in args.impls.split(',') if i]
  if 'pallas' in impls and jax.default_backend() != 'gpu':
    impls.remove('pallas')
  if 'torch' in impls:
    try:
      import torch  # noqa: F401
    except ImportError:
      print('torch is not importable: skipping the torch reference')
      impls.remove('torch')

  if jax.default_backend() == 'gpu':
    bandwidth, source = device_copy_bandwidth_gbs(), f'jax a + 1 on {jax.devices()[0].device_kind}'
  else:
    bandwidth, source = copy_bandwidth_gbs(), 'numpy host copy'
  print(
    f'jax {jax.__version__} on {jax.default_backend()} ({os.cpu_count()} CPUs); XLA_FLAGS={os.environ["XLA_FLAGS"]}'
  )
  print(f'measured copy bandwidth: {bandwidth:.1f} GB/s (read + write; {source})')
  results = {}
  for size in sizes:
    shapes = SIZES[size][1]
    inputs = make_inputs(size)
    results[size] = {}
    for impl in impls:
      if impl == 'dense' and not msda.dense_fits(*inputs[1].shape[:3], inputs[0].shape[1]):
        print(f'  {size:8s} dense      skipped: its sampling matrix is larger than dense.DENSE_MAX_ELEMENTS')
        continue
      try:  # one implementation failing (e.g. a kernel that does not compile) leaves the others' figures
        if impl == 'torch':
          r = time_torch(shapes, inputs, args.repeats, args.torch_device)
        else:
          r = time_jax(impl, shapes, inputs, args.repeats)
      except Exception as e:  # noqa: BLE001 - recorded in the JSON and printed
        results[size][impl] = {'error': f'{type(e).__name__}: {str(e)[:2000]}'}
        print(f'  {size:8s} {impl:10s} FAILED: {type(e).__name__}: {str(e)[:300]}', flush=True)
        continue
      results[size][impl] = r
      print(f'  {size:8s} {impl:10s} fwd {r["fwd_ms"]:9.1f} ms   fwd+bwd {r["fwdbwd_ms"]:9.1f} ms', flush=True)
    f, fb = floor_ms(size, bandwidth)
    results[size]['floor'] = {'fwd_ms': f, 'fwdbwd_ms': fb}

  print()
  print(f'| size | implementation | forward ms | forward+backward ms |  (median of {args.repeats})')
  print('|---|---|---|---|')
  for size, by_impl in results.items():
    for impl, r in by_impl.items():
      name = f'floor ({bandwidth:.1f} GB/s)' if impl == 'floor' else impl
      if 'error' in r:
        print(f'| {size} | {name} | failed | failed |')
        continue
      print(f'| {size} | {name} | {r["fwd_ms"]:.1f} | {r["fwdbwd_ms"]:.1f} |')
  with open(args.json, 'w') as fh:
    json.dump({**results, 'bandwidth': {'gbs': bandwidth, 'source': source}}, fh, indent=2)
  print(f'wrote {args.json}')


if __name__ == '__main__':
  main()
