"""Test setup: XLA flags and the compilation cache must be set before jax is imported anywhere."""

import os
import shutil
import tempfile

from dimaskdino_jax import runtime

# The CPU fusion flag measured in docs/jax_notes.md (14x on deformable attention).
_flags = runtime.with_cpu_flags(os.environ.get('XLA_FLAGS', ''))
# XLA's cheapest backend optimization: the suite compiles hundreds of programs of tiny models and runs each a few
# times, so compiling is most of its time (the tiny training step: 51 s at the default level, 28 s here). Tests
# that compare numbers compare programs compiled alike, or use tolerances (the parity tests already compiled their
# programs at this level through compiler options); a caller's own level in XLA_FLAGS wins.
if 'xla_backend_optimization_level' not in _flags:
  _flags += ' --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
# XLA:CPU's older loop emitters instead of its MLIR fusion emitters: they compile faster (the tiny training step
# 26 s -> 20 s; tests/training/test_trainer.py + tests/modeling/test_model.py 279 s -> 201 s wall on 2 cores).
if 'xla_cpu_use_fusion_emitters' not in _flags:
  _flags += ' --xla_cpu_use_fusion_emitters=false'
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


# The slowest files (pytest --durations, 2026-12-03), handed out first: the xdist workers take whole files
# (--dist loadfile), so when the long ones come last one worker idles while the other finishes them. The scaling
# file first: its three worker subprocesses then overlap with everything else.
_SLOW_FIRST = (
  'tests/training/test_scaling.py',
  'tests/training/test_reliability.py',
  'tests/modeling/test_model.py',
  'tests/training/test_trainer.py',
  'tests/parity/test_parity_full.py',
  'tests/analysis/test_finetune.py',
  'tests/test_gpu_check.py',
  'tests/training/test_periodic_eval.py',
)


def pytest_collection_modifyitems(config, items):
  rank = {path: i for i, path in enumerate(_SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(item.nodeid.split('::')[0], len(rank)))  # stable: the others keep their order
