"""Times the jitted inference (the evaluator's predict: model + top-k on the device) of a config on random weights.

  python benchmarks/inference.py --config configs/dimaskdino_r50_coco.py --canvas 800 1344 --batch-size 1 \
      [--dtype bfloat16] [--steps 10] [--json OUT] [--config.a.b=value ...]

Random uint8 images of (batch, H, W, 3) with image_hw = the test-time resize of a 1333 x 800 image (the canvas
minus the padding to model.size_divisibility), random weights (normal(0, 0.02); the frozen BatchNorm statistics
ones / zeros, so activations stay finite). --dtype bfloat16 sets model.backbone.dtype (the only reduced-precision
switch of the model: the backbone runs in bf16, the transformer, heads and deformable attention in float32).

Prints and writes (--json): compile seconds (the first call, compile + run), the median call time of --steps calls
after it, images per second (batch / median), XLA's memory analysis of the compiled call (arguments, outputs,
temporaries; the weights are arguments) and, on a GPU, the device's peak bytes in use (`memory_stats`), which
counts everything this process put on the device (weights, inputs, outputs, the allocator's fragmentation).
The time covers the device call and the transfer of the outputs to the host (`jax.block_until_ready`), not the
image decoding nor the host-side post-processing (masks to image size, RLE).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dimaskdino_jax import runtime  # noqa: E402

runtime.configure(restart=__name__ == '__main__')  # XLA_FLAGS; malloc tunables (a restart) as a script

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dimaskdino_jax.config import parse_config_overrides  # noqa: E402
from dimaskdino_jax.evaluation.evaluator import make_predict_fn  # noqa: E402
from dimaskdino_jax.modeling.model import build_model  # noqa: E402

_BN_ONES = ('weight', 'running_var')


def random_weights(config, canvas_hw, seed: int = 0) -> dict:
  """Variables of the model of `config` as host arrays: params normal(0, 0.02), frozen BN weight / var 1, bias /
  mean 0. Shapes from `jax.eval_shape` of the init, values from numpy (no init or per-leaf program is compiled)."""
  model = build_model(config)
  image = jax.ShapeDtypeStruct((1, *canvas_hw, 3), jnp.uint8)
  shapes = jax.eval_shape(lambda i: model.init({'params': jax.random.key(0), 'dn': jax.random.key(1)}, i), image)
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    names = [str(getattr(p, 'key', p)) for p in path]
    if names[0] == 'frozen_bn':
      return (np.ones if names[-1] in _BN_ONES else np.zeros)(x.shape, x.dtype)
    return (0.02 * rng.standard_normal(x.shape)).astype(x.dtype)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


def device_peak_bytes():
  """Peak bytes in use on the first device since the process started (None where the backend does not say)."""
  stats = jax.devices()[0].memory_stats()
  return None if not stats else stats.get('peak_bytes_in_use')


# XLA options for a quick compile (CPU smoke runs, benchmarks/gpu_check.py --cpu-smoke; never for timings).
FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_llvm_disable_expensive_passes': True}


def measure(config, canvas_hw, batch_size: int, steps: int, seed: int = 0, fast_compile: bool = False) -> dict:
  h, w = canvas_hw
  div = int(config.model.get('size_divisibility', 32))
  if h % div or w % div:
    raise ValueError(f'--canvas {h} {w}: must be multiples of model.size_divisibility = {div}')
  model = build_model(config)
  variables = jax.device_put(random_weights(config, canvas_hw, seed))
  predict = make_predict_fn(model, int(config.eval.detections_per_image), bool(config.loss.mask_losses), False)
  rng = np.random.default_rng(seed)
  # The image inside the canvas: shortest side test_short_edge, longest <= test_max_size (e.g. 800 x 1333).
  short, long_max = int(config.data.test_short_edge), int(config.data.test_max_size)
  ih, iw = (min(h, short), min(w, long_max)) if h <= w else (min(h, long_max), min(w, short))
  image_hw = jnp.asarray(np.tile([[ih, iw]], (batch_size, 1)).astype(np.int32))
  batches = [
    jax.device_put(rng.integers(0, 256, (batch_size, h, w, 3), dtype=np.uint8)) for _ in range(min(3, steps + 1))
  ]
  weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(variables))
  t0 = time.perf_counter()
  options = FAST_COMPILE if fast_compile else None
  compiled = predict.trace(variables, batches[0], image_hw).lower().compile(compiler_options=options)
  jax.block_until_ready(compiled(variables, batches[0], image_hw))
  compile_s = time.perf_counter() - t0
  times = []
  for i in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(variables, batches[i % len(batches)], image_hw))
    times.append(time.perf_counter() - t0)
  median = float(np.median(times))
  m = compiled.memory_analysis()
  result = {
    'config': config.name,
    'canvas': [h, w],
    'image_hw': [ih, iw],
    'batch_size': batch_size,
    'backbone_dtype': str(config.model.backbone.dtype),
    'msda_impl': str(config.model.msda_impl),
    'backend': jax.default_backend(),
    'device_kind': jax.devices()[0].device_kind,
    'steps': steps,
    'fast_compile': fast_compile,
    'compile_s': round(compile_s, 3),
    'median_ms': round(1000 * median, 3),
    'min_ms': round(1000 * min(times), 3),
    'images_per_s': round(batch_size / median, 3),
    'weight_bytes': int(weight_bytes),
    'device_peak_bytes': device_peak_bytes(),
  }
  if m is not None:
    result.update(
      xla_argument_bytes=int(m.argument_size_in_bytes),
      xla_output_bytes=int(m.output_size_in_bytes),
      xla_temp_bytes=int(m.temp_size_in_bytes),
      xla_peak_bytes=int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes),
    )
  return result


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', required=True, help='configs/NAME.py[:variant] (+ --config.a.b=value)')
  parser.add_argument('--canvas', type=int, nargs=2, metavar=('H', 'W'), help='default: the first eval canvas')
  parser.add_argument('--batch-size', type=int, default=1)
  parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'), help='model.backbone.dtype')
  parser.add_argument('--steps', type=int, default=10, help='timed calls after the first (compile) call')
  parser.add_argument('--json', help='write the figures here')
  parser.add_argument('--fast-compile', action='store_true', help="XLA's lowest optimization (smoke runs only)")
  args, config = parse_config_overrides(parser, sys.argv[1:] if argv is None else list(argv))
  if args.batch_size < 1 or args.steps < 1:
    parser.error('--batch-size and --steps must be >= 1')
  config.model.backbone.dtype = args.dtype
  canvas = tuple(args.canvas) if args.canvas else tuple(int(v) for v in config.data.eval_canvases[0])
  try:
    result = measure(config, canvas, args.batch_size, args.steps, fast_compile=args.fast_compile)
  except ValueError as e:
    parser.error(str(e))
  print(
    f'{result["config"]} {result["backbone_dtype"]} batch {args.batch_size} canvas {canvas[0]}x{canvas[1]} on '
    f'{result["device_kind"]}: compile {result["compile_s"]:.1f} s, median {result["median_ms"]:.1f} ms, '
    f'{result["images_per_s"]:.2f} images/s, device peak '
    + ('n/a' if result['device_peak_bytes'] is None else f'{result["device_peak_bytes"] / 2**30:.2f} GiB'),
    flush=True,
  )
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == '__main__':
  main()
