"""Compiles the Pallas deformable-attention kernels for NVIDIA GPUs on a machine without one.

jax lowers a Triton `pallas_call` for CUDA to a `__gpu$xla.gpu.triton` custom call that carries the kernel's
Triton IR (MLIR bytecode); on a GPU, XLA compiles that IR when it compiles the program. This module takes the
IR out of a program lowered for CUDA (`lowering_platforms=('cuda',)`, which runs on a CPU), hands it to the
Triton compiler that the CUDA plugin of jaxlib registers (`jax._src.lib.triton.compile`: Triton IR -> PTX, no
GPU needed), and assembles the PTX with `ptxas` (SASS, no GPU needed) to read the registers, spills and shared
memory of each kernel. So CI catches kernels that lower but do not compile, and the kernels' register budget is
a recorded figure, without a GPU. It does not run them: numbers come from the interpret-mode tests
(tests/kernels) and speed only from a GPU (benchmarks/msda.py).

Needs, beside the project: `jax-cuda12-plugin` and `jax-cuda12-pjrt` of the installed jaxlib's version (for the
Triton compiler) and `nvidia-cuda-nvcc-cu12` (for ptxas); `make setup-cuda-compile` installs them into
`.venv/cuda-compile`, which is put on PYTHONPATH of the process that runs this module only, so the project's own
environment stays CPU-only. Without a GPU the plugin's CUDA version check must be skipped
(JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1) and JAX_PLATFORMS=cpu keeps jax from creating a CUDA client.

    JAX_PLATFORMS=cpu JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 PYTHONPATH=.venv/cuda-compile \\
      .venv/bin/python -m kernels.ms_deform_attn.cuda_compile --cases encoder,decoder --json FILE

`jax._src.lib.triton` is private jax API (jax 0.10.2 / jaxlib 0.10.2): this is a developer check, not a runtime
dependency.
"""

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

if __name__ == '__main__':  # before jax reads them: compile only, never a CUDA client
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  os.environ.setdefault('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', '1')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from kernels.ms_deform_attn import TRITON_CALL, lowering_for, normalize_shapes  # noqa: E402
from kernels.ms_deform_attn.pallas import ms_deform_attn_pallas  # noqa: E402

# Compute capability -> ptxas architecture (Triton emits the 'a' variant, e.g. sm_90a, for Hopper).
ARCHES = {'8.0': 'sm_80', '9.0': 'sm_90a'}


@dataclasses.dataclass(frozen=True)
class Case:
  """One op configuration: value (N, S, M, D) over `shapes`, Lq queries, P points per level."""

  shapes: tuple[tuple[int, int], ...]
  n: int
  lq: int
  m: int
  d: int
  p: int
  dtype: str = 'float32'


# The model's encoder and decoder sizes (benchmarks/msda.py) in both dtypes, and one with every dimension padded
# (3 heads of 5 channels, 3 levels x 3 points, non-square levels).
CASES = {
  'encoder': Case(((128, 128), (64, 64), (32, 32), (16, 16)), 1, 21760, 8, 32, 4),
  'encoder_bf16': Case(((128, 128), (64, 64), (32, 32), (16, 16)), 1, 21760, 8, 32, 4, 'bfloat16'),
  'decoder': Case(((128, 128), (64, 64), (32, 32), (16, 16)), 1, 400, 8, 32, 4),
  'odd': Case(((5, 7), (3, 4), (2, 2)), 2, 20, 3, 5, 3),
}


@dataclasses.dataclass(frozen=True)
class TritonKernel:
  name: str
  ir: bytes  # Triton IR, MLIR bytecode
  num_warps: int
  num_stages: int


def triton_kernels(lowered) -> list[TritonKernel]:
  """The Triton kernels of a program lowered for CUDA, in program order."""
  from jax._src.lib.mlir import ir

  found = []

  def walk(op):
    for region in op.regions:
      for block in region.blocks:
        for child in block.operations:
          child = child.operation
          if child.name == 'stablehlo.custom_call':
            target = ir.StringAttr(child.attributes['call_target_name']).value
            if target == TRITON_CALL:
              cfg = ir.DictAttr(child.attributes['mhlo.backend_config'])
              found.append(
                TritonKernel(
                  ir.StringAttr(cfg['name']).value,
                  ir.StringAttr(cfg['ir']).value_bytes,
                  ir.IntegerAttr(cfg['num_warps']).value,
                  ir.IntegerAttr(cfg['num_stages']).value,
                )
              )
          walk(child)

  walk(lowered.compiler_ir('stablehlo').operation)
  return found


def lower_msda(case: Case):
  """The op's forward and backward (a vjp, so both kernels stay live) for `case`, lowered for CUDA."""
  dt = jnp.dtype(case.dtype)
  shapes, starts = normalize_shapes(case.shapes)
  s, nl = sum(h * w for h, w in shapes), len(shapes)
  value = jax.ShapeDtypeStruct((case.n, s, case.m, case.d), dt)
  loc = jax.ShapeDtypeStruct((case.n, case.lq, case.m, nl, case.p, 2), dt)
  attn = jax.ShapeDtypeStruct((case.n, case.lq, case.m, nl, case.p), dt)

  def fwd_bwd(v, lc, a):
    out, vjp = jax.vjp(lambda v, lc, a: ms_deform_attn_pallas(v, shapes, starts, lc, a, False), v, lc, a)
    return out, vjp(out)

  with lowering_for(('cuda',)):
    return jax.jit(fwd_bwd).trace(value, loc, attn).lower(lowering_platforms=('cuda',))


def require_cuda_plugin():
  """Registers the installed PJRT plugins; raises RuntimeError saying what to install when jaxlib's CUDA plugin
  (its Triton compiler, and XLA:GPU for `dimaskdino_jax.gpu_aot`) is not among them."""
  from jax._src.lib import triton

  jax.devices()  # registers the installed PJRT plugins, and with them the CUDA Triton compiler
  if not triton.has_compilation_handler('cuda'):
    raise RuntimeError(
      "jaxlib's CUDA plugin is not loaded: install jax-cuda12-plugin and jax-cuda12-pjrt of the installed jaxlib "
      f'version ({jax.__version__}) (`make setup-cuda-compile`, then PYTHONPATH=.venv/cuda-compile), and without a '
      'GPU set JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 and JAX_PLATFORMS=cpu'
    )


def compile_ptx(kernel: TritonKernel, arch: str = '9.0'):
  """Triton IR -> (PTX text, shared memory bytes) with jaxlib's CUDA Triton compiler."""
  from jax._src.lib import triton

  require_cuda_plugin()
  res = triton.compile('cuda', kernel.ir, arch, num_warps=kernel.num_warps, num_ctas=1, num_stages=kernel.num_stages)
  return res.asm, int(res.smem_bytes)


def find_ptxas() -> str:
  try:
    import nvidia.cuda_nvcc  # nvidia-cuda-nvcc-cu12

    for root in nvidia.cuda_nvcc.__path__:
      path = Path(root) / 'bin' / 'ptxas'
      if path.is_file():
        return str(path)
  except ImportError:
    pass
  found = shutil.which('ptxas')
  if found is None:
    raise RuntimeError('ptxas not found: install nvidia-cuda-nvcc-cu12 (`make setup-cuda-compile`) or put it on PATH')
  return found


_PTXAS_INFO = {
  'registers': re.compile(r'Used (\d+) registers'),
  'spill_stores': re.compile(r'(\d+) bytes spill stores'),
  'spill_loads': re.compile(r'(\d+) bytes spill loads'),
  'stack_bytes': re.compile(r'(\d+) bytes stack frame'),
}


def ptxas_stats(ptx: str, sm: str) -> dict:
  """Assembles `ptx` for `sm` with `ptxas -v`; returns its registers, spills and stack (bytes), and the SASS size.

  Raises RuntimeError with ptxas' output when it fails."""
  with tempfile.TemporaryDirectory() as tmp:
    src, out = Path(tmp) / 'k.ptx', Path(tmp) / 'k.cubin'
    src.write_text(ptx)
    proc = subprocess.run(
      [find_ptxas(), f'-arch={sm}', '-v', str(src), '-o', str(out)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
      raise RuntimeError(f'ptxas -arch={sm} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}')
    info = proc.stdout + proc.stderr
    stats = {}
    for key, pattern in _PTXAS_INFO.items():
      match = pattern.search(info)
      if match is None:
        raise RuntimeError(f'ptxas output has no {key!r} figure:\n{info}')
      stats[key] = int(match.group(1))
    stats['cubin_bytes'] = out.stat().st_size
  return stats


def ptx_target(ptx: str) -> str:
  match = re.search(r'^\.target\s+(\S+)', ptx, re.M)
  return match.group(1) if match else ''


def compile_case(case: Case, arches=('9.0',), assemble=True) -> list[dict]:
  """One row per (kernel, arch): name, arch, PTX target, shared memory, atomics, and ptxas' figures."""
  rows = []
  for kernel in triton_kernels(lower_msda(case)):
    for arch in arches:
      ptx, smem = compile_ptx(kernel, arch)
      row = {
        'kernel': kernel.name,
        'arch': arch,
        'target': ptx_target(ptx),
        'num_warps': kernel.num_warps,
        'smem_bytes': smem,
        'atomic_adds': len(re.findall(r'\batom\.global\S*\.add\b|\bred\.global\S*\.add\b', ptx)),
        'entry': bool(re.search(rf'\.entry\s+{re.escape(kernel.name)}\b', ptx)),
      }
      if assemble:
        row.update(ptxas_stats(ptx, ARCHES[arch]))
      rows.append(row)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--cases', default=','.join(CASES), help=f'comma-separated, from {sorted(CASES)}')
  parser.add_argument('--arches', default='9.0,8.0', help=f'compute capabilities, from {sorted(ARCHES)}')
  parser.add_argument('--no-ptxas', action='store_true', help='stop at PTX (no registers and spills)')
  parser.add_argument('--json', help='write {case: [row, ...]} here')
  args = parser.parse_args(argv)
  cases = [c for c in args.cases.split(',') if c]
  arches = [a for a in args.arches.split(',') if a]
  for name in cases:
    if name not in CASES:
      parser.error(f'--cases: unknown case {name!r}; known: {sorted(CASES)}')
  for arch in arches:
    if arch not in ARCHES:
      parser.error(f'--arches: unknown compute capability {arch!r}; known: {sorted(ARCHES)}')
  results = {}
  cols = ('kernel', 'arch', 'target', 'smem_bytes', 'atomic_adds', 'registers', 'spill_stores', 'spill_loads')
  print(f'jax {jax.__version__}, Triton IR -> PTX -> ptxas, no GPU')
  print(' '.join(f'{c:>18}' for c in ('case',) + cols))
  for name in cases:
    results[name] = compile_case(CASES[name], arches, assemble=not args.no_ptxas)
    for row in results[name]:
      print(' '.join(f'{v:>18}' for v in [name] + [str(row.get(c, '-')) for c in cols]))
  if args.json:
    Path(args.json).write_text(json.dumps({'jax': jax.__version__, 'cases': results}, indent=1))
  return results


if __name__ == '__main__':
  main()
