"""dimaskdino_jax.runtime: when the entry points restart with glibc's malloc tunables, and that the restarted process
has them in effect (freed large blocks are reused instead of being mapped and faulted in again)."""

import os
import subprocess
import sys

import pytest

from dimaskdino_jax import runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = (2, 36)


def test_malloc_environment_decisions():
  env = runtime.malloc_environment({'PATH': '/bin'}, GLIBC)
  assert env == {'PATH': '/bin', 'GLIBC_TUNABLES': runtime.MALLOC_TUNABLES}
  # Another tunable of the user's is kept, ours appended.
  env = runtime.malloc_environment({'GLIBC_TUNABLES': 'glibc.rtld.nns=8'}, GLIBC)
  assert env['GLIBC_TUNABLES'] == 'glibc.rtld.nns=8:' + runtime.MALLOC_TUNABLES
  # No restart: not glibc, opted out, malloc tunables already set (ours after the restart, or the user's).
  assert runtime.malloc_environment({}, None) is None
  assert runtime.malloc_environment({runtime.OPT_OUT: 'system'}, GLIBC) is None
  assert runtime.malloc_environment({runtime.OPT_OUT: 'SYSTEM'}, GLIBC) is None
  assert runtime.malloc_environment({'GLIBC_TUNABLES': runtime.MALLOC_TUNABLES}, GLIBC) is None
  assert runtime.malloc_environment({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, GLIBC) is None


# Run as `python -c`: configures (restarting where it applies), then maps, writes and frees a 64 MiB block 12 times
# and prints the tunables in effect and the minor page faults those 12 rounds took.
_PROBE = """
from dimaskdino_jax import runtime
runtime.configure()
import ctypes, os, resource
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
n = 64 << 20
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(12):
  p = libc.malloc(n)
  ctypes.memset(p, 1, n)
  libc.free(p)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(f"{faults}|{os.environ.get('GLIBC_TUNABLES', '')}")
"""


def _clean_env(**env):
  """This environment without malloc settings, plus `env`."""
  return {**{k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', runtime.OPT_OUT)}, **env}


def _probe(**env):
  out = subprocess.run(
    [sys.executable, '-c', _PROBE], env=_clean_env(**env), cwd=REPO, capture_output=True, text=True, check=True
  )
  faults, tunables = out.stdout.strip().splitlines()[-1].split('|')
  return tunables, int(faults)


@pytest.mark.skipif(runtime.glibc_version() is None, reason='glibc only')
def test_restart_applies_the_tunables_and_blocks_are_reused():
  tunables, faults = _probe()
  assert tunables == runtime.MALLOC_TUNABLES  # the restarted process has them
  _, default_faults = _probe(**{runtime.OPT_OUT: 'system'})  # no restart: glibc maps each block afresh
  pages = 12 * (64 << 20) // os.sysconf('SC_PAGE_SIZE')
  assert default_faults > 0.9 * pages, default_faults  # every page of every round faulted in
  assert faults < 0.2 * pages, (faults, default_faults)  # the first round at most (fewer with huge pages)


def test_the_command_runner_passes_the_tunables_on():
  show = [sys.executable, '-c', "import os; print(os.environ.get('GLIBC_TUNABLES', ''))"]
  run = lambda env: subprocess.run(  # noqa: E731
    [sys.executable, '-m', 'dimaskdino_jax.runtime', *show],
    env=env,
    cwd=REPO,
    capture_output=True,
    text=True,
    check=True,
  ).stdout.strip()
  expected = runtime.MALLOC_TUNABLES if runtime.glibc_version() else ''
  assert run(_clean_env()) == expected
  assert run(_clean_env(**{runtime.OPT_OUT: 'system'})) == ''


@pytest.mark.skipif(runtime.glibc_version() is None, reason='glibc only')
def test_describe_malloc_names_the_settings_in_effect(monkeypatch):
  monkeypatch.setenv('GLIBC_TUNABLES', runtime.MALLOC_TUNABLES)
  assert runtime.describe_malloc() == f'glibc tunables {runtime.MALLOC_TUNABLES}'
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.rtld.nns=8')
  assert runtime.describe_malloc() == 'glibc defaults'
  monkeypatch.delenv('GLIBC_TUNABLES')
  assert runtime.describe_malloc() == 'glibc defaults'


def test_with_cpu_flags_adds_the_fusion_flag_once():
  assert runtime.with_cpu_flags('') == runtime.XLA_CPU_FLAGS
  assert runtime.with_cpu_flags('--a=1') == f'--a=1 {runtime.XLA_CPU_FLAGS}'
  mine = '--xla_cpu_experimental_ynn_fusion_type=none'  # a caller's own choice is kept
  assert runtime.with_cpu_flags(mine) == mine
  assert runtime.with_cpu_flags(runtime.with_cpu_flags('--a=1')) == runtime.with_cpu_flags('--a=1')
