r"""Compile the exported inference for an NVIDIA GPU on a machine without one (XLA:GPU ahead-of-time, deviceless).

  python -m dimaskdino_jax.export --config configs/shapes.py --workdir runs/shapes --platforms cuda --out m.bin
  JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 PYTHONPATH=.venv/cuda-compile \
    .venv/bin/python -m dimaskdino_jax.gpu_aot m.bin [--target h100] [--json OUT]
  # or a config with random weights (memory does not depend on their values), exported in memory first:
  ... -m dimaskdino_jax.gpu_aot --config configs/dimaskdino_r50_coco.py:12ep --canvas 800 1344 [--batch-size 1]

XLA's GPU compiler runs here on a described device instead of a real one: the exported program (the Pallas/Triton
deformable-attention kernels included, which XLA compiles itself) becomes H100 machine code, and XLA's buffer
assignment gives the device memory the call needs (arguments = the images, outputs, temporaries; the weights are
constants of the program, `weight_bytes` with --config). Nothing runs, so no result or speed comes from this. It
needs jaxlib's CUDA plugin (`make setup-cuda-compile` installs it into .venv/cuda-compile; put that on PYTHONPATH
of this command only) and, without a GPU, JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 (the plugin's check of the local CUDA
installation).

Deviceless limits, as measured with jaxlib 0.10.2: XLA cannot choose tile sizes for its own Triton matrix-product
fusions without a device ("Couldn't find output tile sizes"), so this compiles with `xla_gpu_enable_triton_gemm`
off (cuBLAS calls instead); on a GPU XLA autotunes those fusions. Host callbacks cannot be lowered without a
device backend, so the train step (its matcher is a scipy callback) cannot be compiled this way, only callback-free
programs like the exported inference.
"""

import argparse
import json
import os
import re
import time

if __name__ == '__main__':  # before jax reads them: compile only, never a CUDA client
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  os.environ.setdefault('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', '1')

import jax  # noqa: E402

from kernels.ms_deform_attn import TRITON_CALL  # noqa: E402

# The described devices (XLA's GpuTargetConfigProto, text format): the fields XLA's GPU compiler reads, with the
# properties the card reports (as XLA's own GPU spec files record them).
TARGETS = {
  'h100': """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84942979072
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
""",
}
COMPILER_OPTIONS = {'xla_gpu_enable_triton_gemm': False}  # see the module docstring


def gpu_devices(target: str = 'h100'):
  """Compile-only devices of one `target` GPU (no GPU needed)."""
  from jax.experimental import topologies

  from kernels.ms_deform_attn.cuda_compile import require_cuda_plugin

  if target not in TARGETS:
    raise ValueError(f'unknown GPU target {target!r}; known: {sorted(TARGETS)}')
  require_cuda_plugin()
  return list(topologies.get_topology_desc('', 'cuda', target_config=TARGETS[target], topology='1x1x1').devices)


def random_variables(config, canvas_hw, seed: int = 0) -> dict:
  """Variables of the model of `config` (all collections), each leaf normal(0, 0.02): for memory and compile checks,
  without a checkpoint and without running the model's init (its shapes come from `jax.eval_shape`)."""
  from dimaskdino_jax.modeling.model import build_model

  model = build_model(config)
  image = jax.ShapeDtypeStruct((1, *canvas_hw, 3), jax.numpy.uint8)
  shapes = jax.eval_shape(lambda i: model.init({'params': jax.random.key(0), 'dn': jax.random.key(1)}, i), image)
  leaves, tree = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return tree.unflatten([(0.02 * jax.random.normal(k, x.shape)).astype(x.dtype) for k, x in zip(keys, leaves)])


def compile_exported(exported: jax.export.Exported, target: str = 'h100'):
  """XLA:GPU compiles `exported` (exported for 'cuda') for `target`; returns the `jax.stages.Compiled`."""
  if 'cuda' not in exported.platforms:
    raise ValueError(f'the file was exported for {exported.platforms}; export it with --platforms cuda')
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  sharding = NamedSharding(Mesh(gpu_devices(target), ('x',)), PartitionSpec())
  args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in exported.in_avals]
  return jax.jit(exported.call).trace(*args).lower().compile(compiler_options=COMPILER_OPTIONS)


def summary(compiled) -> dict:
  """Memory (bytes) from XLA's buffer assignment, and the Triton kernels in the compiled program."""
  m = compiled.memory_analysis()
  text = compiled.as_text()
  return {
    'argument_bytes': m.argument_size_in_bytes,
    'output_bytes': m.output_size_in_bytes,
    'temp_bytes': m.temp_size_in_bytes,
    'alias_bytes': m.alias_size_in_bytes,
    'peak_bytes': m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes,
    'triton_calls_compiled': text.count(f'custom_call_target="{TRITON_CALL}"'),
    'kernel_names': sorted(set(re.findall(r'\bms_deform_attn_(?:fwd|bwd)\b', text))),
  }


def main(argv=None) -> dict:
  import sys

  from dimaskdino_jax.config import parse_config_overrides
  from dimaskdino_jax.export import export_predict, load_exported

  argv = sys.argv[1:] if argv is None else list(argv)
  # --config (random weights) or an exported FILE; decided first, since override values like '(24, 12)' would be
  # taken for an optional positional FILE by argparse.
  from_config = any(a == '--config' or a.startswith('--config=') for a in argv)
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  if from_config:
    parser.add_argument('--config', required=True, help='configs/NAME.py[:variant] (+ --config.a.b=value)')
    parser.add_argument('--canvas', type=int, nargs=2, metavar=('H', 'W'), help='default: the first eval canvas')
    parser.add_argument('--batch-size', type=int, default=1)
  else:
    parser.add_argument('file', help='a file written by `python -m dimaskdino_jax.export --platforms cuda`')
  parser.add_argument('--target', default='h100', choices=sorted(TARGETS))
  parser.add_argument('--json', help='write the summary here')
  result = {}
  if from_config:
    args, config = parse_config_overrides(parser, argv)
    canvas = tuple(args.canvas) if args.canvas else tuple(int(v) for v in config.data.eval_canvases[0])
    variables = random_variables(config, canvas)
    exported = export_predict(config, variables, canvas, args.batch_size, platforms=('cuda',))
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(variables))
    result.update(config=args.config, canvas=list(canvas), batch_size=args.batch_size, weight_bytes=weight_bytes)
  else:
    args = parser.parse_args(argv)
    exported, _ = load_exported(args.file)
    result['file'] = args.file
  result['target'] = args.target
  t0 = time.perf_counter()
  compiled = compile_exported(exported, args.target)
  result['compile_s'] = round(time.perf_counter() - t0, 2)
  result.update(summary(compiled))
  print(json.dumps(result, indent=1))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == '__main__':
  main()
