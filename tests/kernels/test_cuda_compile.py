"""The Pallas kernels compiled for NVIDIA GPUs on this CPU-only machine (kernels/ms_deform_attn/cuda_compile.py).

Triton IR -> PTX by jaxlib's CUDA Triton compiler, then PTX -> sm_80 / sm_90a machine code by ptxas: catches
kernels that lower but do not compile, and guards their register budget. The CUDA plugin and ptxas live in
`.venv/cuda-compile` (`make setup-cuda-compile`, which `make test` runs), put on PYTHONPATH of a subprocess only.
"""

import json

import pytest

from tests.cuda_compile_env import run_module

CASES = ('encoder', 'encoder_bf16', 'odd')
ARCH_TARGETS = {'9.0': 'sm_90a', '8.0': 'sm_80'}
# Measured with jax 0.10.2 (BENCHMARKS.md): 31-56 registers and no spills. The first kernel version, which gathered
# a block's K points at once, needed ~180 forward and 255 with 48-1500 bytes of spills backward: this bound fails it.
MAX_REGISTERS = 64


@pytest.fixture(scope='module')
def compiled(tmp_path_factory):
  out = tmp_path_factory.mktemp('cuda') / 'compiled.json'
  args = ('--cases', ','.join(CASES), '--arches', ','.join(ARCH_TARGETS), '--json', str(out))
  run_module('kernels.ms_deform_attn.cuda_compile', *args)
  return json.loads(out.read_text())['cases']


@pytest.mark.parametrize('case', CASES)
def test_kernels_compile_to_gpu_machine_code(compiled, case):
  rows = compiled[case]
  # forward then backward (the vjp keeps both), each for both architectures
  assert [(r['kernel'], r['arch']) for r in rows] == [
    (k, a) for k in ('ms_deform_attn_fwd', 'ms_deform_attn_bwd') for a in ARCH_TARGETS
  ]
  for r in rows:
    where = f'{case} {r["kernel"]} {r["arch"]}'
    assert r['target'] == ARCH_TARGETS[r['arch']], where
    assert r['entry'], f'{where}: the PTX has no entry of that name'
    assert r['cubin_bytes'] > 0, where
    # the value gradient's atomics are in the backward kernel only
    assert (r['atomic_adds'] > 0) == (r['kernel'] == 'ms_deform_attn_bwd'), where
    assert r['spill_stores'] == 0 and r['spill_loads'] == 0, f'{where}: spills {r}'
    assert r['registers'] <= MAX_REGISTERS, f'{where}: {r["registers"]} registers'


def test_without_the_cuda_plugin_the_error_says_what_to_install():
  # This test process has no jaxlib CUDA plugin (it lives in .venv/cuda-compile, on PYTHONPATH of subprocesses only).
  from kernels.ms_deform_attn.cuda_compile import require_cuda_plugin

  with pytest.raises(RuntimeError, match='make setup-cuda-compile'):
    require_cuda_plugin()
