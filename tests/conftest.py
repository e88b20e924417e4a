"""Test setup: XLA flags and the compilation cache must be set before jax is imported anywhere."""

import os
import shutil
import tempfile

# The CPU fusion flag measured in docs/jax_notes.md (14x on deformable attention).
_flags = os.environ.get('XLA_FLAGS', '')
if 'ynn_fusion_type' not in _flags:
  _flags += ' --xla_cpu_experimental_ynn_fusion_type=-reduce'
os.environ['XLA_FLAGS'] = _flags.strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# One persistent XLA compilation cache for the whole run: many tests compile the same tiny programs (the training
# step of tests/training/reliability_config.py, the tiny model's init and predict) in different files, in both xdist
# workers and in the subprocesses they start (which inherit these variables); each program then compiles once per
# run. JAX only caches programs that took >= 1 s to compile. The folder is new for every run (the pytest process
# that creates it removes it at the end), so no test ever sees a program of an earlier run; a cache set by the
# caller (JAX_COMPILATION_CACHE_DIR) is used as it is and kept. The size limit turns on the cache's file lock, so
# the two workers never read an entry that the other is still writing.
_CACHE_OWNER = '_DIMASKDINO_TEST_XLA_CACHE_OWNER'
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='dimaskdino-jax-test-xla-cache-')
  os.environ[_CACHE_OWNER] = str(os.getpid())
os.environ.setdefault('JAX_COMPILATION_CACHE_MAX_SIZE', str(16 << 30))


def pytest_unconfigure(config):
  if os.environ.get(_CACHE_OWNER) == str(os.getpid()):
    shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
