r"""Export the jitted inference function as serialized StableHLO (`jax.export`) for a fixed canvas and batch size.

  python -m dimaskdino_jax.export --config configs/shapes.py --workdir runs/shapes --out runs/shapes/model.bin
  python -m dimaskdino_jax.export --config configs/dimaskdino_r50_coco.py --checkpoint runs/r50/checkpoints/90000 \
      --out r50.bin --canvas 800 1344 --batch-size 1

The exported function is the evaluator's predict (model in inference mode + top-k on the device) with the weights
baked in as constants:

  (images uint8 (B, H, W, 3), image_hw int32 (B, 2))
      -> (scores (B, k), labels (B, k), queries (B, k), boxes (B, k, 4) cxcywh, mask_logits (B, k, H/4, W/4))

images: RGB, resized (shortest side data.test_short_edge, longest <= data.test_max_size) and placed top-left in the
H x W canvas, the rest filled with the pixel mean; image_hw: the resized size inside the canvas. The host-side
post-processing (evaluation/postprocess.py: postprocess_batch) turns the outputs into boxes and masks of the
original image. OUT gets the serialized bytes; OUT.json the canvas, batch size, k, class names, input and output
specs and the platforms. `--platforms cuda` (or `cpu cuda` for one file that runs on both) exports for a GPU from any
machine, a CPU-only one included: the deformable attention is then the implementation picked for the target
platforms (kernels/ms_deform_attn: `lowering_for`); for `--platforms cuda` alone, 'auto' and 'pallas' put the Triton
kernels in the file, which jax.export does not promise to load with another jaxlib version (OUT.json:
`triton_kernel`; `--config.model.msda_impl=xla` leaves them out). Reload
with `load_exported(OUT)` (or `jax.export.deserialize(bytes).call(...)`): no model code is needed, only jax.
"""

import os

from dimaskdino_jax import runtime  # noqa: E402

runtime.configure(restart=__name__ == '__main__')  # XLA_FLAGS; malloc tunables (a restart) as a script

import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from kernels.ms_deform_attn import TRITON_CALL, lowering_for  # noqa: E402

OUTPUT_NAMES = ('scores', 'labels', 'queries', 'boxes', 'mask_logits')


def export_predict(config, variables, canvas_hw, batch_size: int = 1, platforms=None) -> jax.export.Exported:
  """The predict function of `config` with `variables` baked in, exported for (batch_size, *canvas_hw, 3) images."""
  from dimaskdino_jax.evaluation.evaluator import make_predict_fn
  from dimaskdino_jax.modeling.model import build_model

  h, w = (int(v) for v in canvas_hw)
  div = int(config.model.get('size_divisibility', 32))
  if h % div or w % div:
    raise ValueError(f'canvas {h}x{w} must be a multiple of model.size_divisibility = {div}')
  with_masks = bool(config.loss.get('mask_losses', True))
  predict = make_predict_fn(build_model(config), int(config.eval.detections_per_image), with_masks, False)
  variables = jax.tree.map(jnp.asarray, variables)

  def fn(images, image_hw):
    (topk,) = predict(variables, images, image_hw)
    return tuple(getattr(topk, n) for n in OUTPUT_NAMES if getattr(topk, n) is not None)

  args = (
    jax.ShapeDtypeStruct((batch_size, h, w, 3), jnp.uint8),
    jax.ShapeDtypeStruct((batch_size, 2), jnp.int32),
  )
  # The deformable attention's implementation is chosen for the target platforms, not for this machine: for
  # ('cuda',) the GPU choice (from a CPU-only machine too), for ('cpu', 'cuda') the XLA formulation both run.
  # The Pallas kernel lowers to a Triton custom call, which jax.export refuses by default (no compatibility
  # guarantee across jaxlib versions): allowed here, and `triton_kernel` in the metadata says the file needs the
  # jaxlib that wrote it.
  allow_triton = [jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
  # JAX reuses traced sub-functions (scan / remat bodies) by their inputs only, not by `lowering_for`: clear the
  # caches around an export for other platforms, so it does not reuse a trace made for this machine, nor leaves
  # one behind for the live model (a Triton kernel in a CPU computation).
  if platforms is not None:
    jax.clear_caches()
  try:
    with lowering_for(platforms):
      return jax.export.export(jax.jit(fn), platforms=platforms, disabled_checks=allow_triton)(*args)
  finally:
    if platforms is not None:
      jax.clear_caches()


def save_exported(exported: jax.export.Exported, path: str, metadata: dict) -> None:
  """Writes exported.serialize() to `path` and `metadata` (+ the input / output specs) to `path`.json."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with open(path + '.tmp', 'wb') as f:
    f.write(exported.serialize())
  os.replace(path + '.tmp', path)
  meta = dict(metadata)
  meta['inputs'] = [{'shape': list(a.shape), 'dtype': str(a.dtype)} for a in exported.in_avals]
  names = OUTPUT_NAMES[: len(exported.out_avals)]
  meta['outputs'] = [
    {'name': n, 'shape': list(a.shape), 'dtype': str(a.dtype)} for n, a in zip(names, exported.out_avals)
  ]
  meta['platforms'] = list(exported.platforms)
  meta['jax_version'] = jax.__version__
  meta['triton_kernel'] = TRITON_CALL in exported.mlir_module()  # True: load with the same jaxlib version only
  with open(path + '.json', 'w') as f:
    json.dump(meta, f, indent=2)


def load_exported(path: str) -> tuple[jax.export.Exported, dict]:
  """(the deserialized Exported: call it with .call(images, image_hw), the metadata of path.json or {})."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such exported model')
  with open(path, 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  meta = {}
  if os.path.isfile(path + '.json'):
    with open(path + '.json') as f:
      meta = json.load(f)
  return exported, meta


def main(argv=None) -> str:
  import sys

  from dimaskdino_jax.config import checkpoint_cli_parser, parse_config_overrides

  parser = checkpoint_cli_parser(__doc__, 'exports')
  parser.add_argument('--out', required=True, help='output file (e.g. model.bin); metadata goes to OUT.json')
  parser.add_argument(
    '--canvas', type=int, nargs=2, default=None, metavar=('H', 'W'), help='default: first eval canvas'
  )
  parser.add_argument('--batch-size', type=int, default=1)
  parser.add_argument('--platforms', nargs='+', default=None, help='e.g. cpu cuda (default: the current backend)')
  args, config = parse_config_overrides(parser, sys.argv[1:] if argv is None else argv)

  from dimaskdino_jax.evaluation.inference import class_info
  from dimaskdino_jax.training.checkpoint import restore_for_cli

  step_dir, step, variables = restore_for_cli(config, args.workdir, args.checkpoint)
  canvas = tuple(args.canvas) if args.canvas else tuple(int(v) for v in config.data.eval_canvases[0])
  try:
    exported = export_predict(config, variables, canvas, args.batch_size, platforms=args.platforms)
  except ValueError as e:
    raise SystemExit(f'error: {e}') from None
  names, ids, _ = class_info(config)
  meta = {
    'checkpoint': step_dir,
    'step': step,
    'canvas': list(canvas),
    'batch_size': args.batch_size,
    'detections_per_image': int(config.eval.detections_per_image),
    'test_short_edge': int(config.data.test_short_edge),
    'test_max_size': int(config.data.test_max_size),
    'pixel_fill': [float(v) for v in config.model.pixel_mean],
    'class_names': names,
    'category_ids': ids,
  }
  save_exported(exported, args.out, meta)
  print(f'wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB) and {args.out}.json', flush=True)
  return args.out


if __name__ == '__main__':
  main()
