"""Running a command with jaxlib's CUDA compiler on this CPU-only machine (tests of GPU compilation, no GPU).

`make setup-cuda-compile` (run by `make test`) installs jax-cuda12-plugin, jax-cuda12-pjrt and ptxas into
`.venv/cuda-compile`; it goes on PYTHONPATH of a subprocess only, so jax in the test processes stays CPU-only.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYER = Path(os.environ.get('DIMASKDINO_CUDA_COMPILE', ROOT / '.venv' / 'cuda-compile'))


def run_module(module: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
  """`python -m module args` with the CUDA compiler importable; skips when it is not installed, fails on errors."""
  if not (LAYER / 'jax_plugins').is_dir():
    pytest.skip(f'{LAYER} holds no jax CUDA plugin: `make setup-cuda-compile` installs it')
  env = dict(
    os.environ,
    PYTHONPATH=os.pathsep.join([str(LAYER), str(ROOT)]),
    JAX_PLATFORMS='cpu',
    JAX_SKIP_CUDA_CONSTRAINTS_CHECK='1',
  )
  cmd = [sys.executable, '-m', module, *args]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
  assert proc.returncode == 0, f'{" ".join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}'
  return proc
