"""Process settings for fast CPU runs, applied by the command-line entry points before jax starts.

Two settings, both of the process rather than of the program, and neither changes a computed value:

* `XLA_FLAGS` (a default; a value already set wins): `XLA_CPU_FLAGS`, XLA:CPU's YNNPACK fusions without the
  reductions (docs/jax_notes.md, "Deformable attention on XLA:CPU").
* glibc's malloc tunables (`MALLOC_TUNABLES`), which glibc reads only when a process starts, so `configure`
  starts the command again with them in `GLIBC_TUNABLES` (`os.execve` of the same interpreter and arguments).
  XLA:CPU allocates each step's temporaries (hundreds of MB for the demo, GBs for the R50 model) with malloc, and
  glibc serves blocks that large with a fresh `mmap` and returns them with `munmap` when freed, so every step
  faulted its temporaries in again, page by page (~48,000 minor faults and ~100 ms of kernel time per step of the
  demo's config). The tunables keep freed memory in the heap for reuse (`mmap_max=0`, a trim threshold of
  1 TB) and back what glibc does map with transparent huge pages (`hugetlb=1`: `madvise`, glibc >= 2.35;
  earlier versions ignore it). Measured (docs/jax_notes.md, "glibc's malloc and XLA:CPU's temporaries";
  BENCHMARKS.md, "Against the official code", session 22): the demo's jitted step 247 -> 191 ms. The cost: a
  process keeps the memory it has freed until it exits, and fragments its heap more (the R50 training step's peak
  RSS 8.7 -> 13.4 GiB; the demo's unchanged at 2.8 GB).

Opt out with `DIMASKDINO_MALLOC=system` (no restart, glibc's defaults); a `GLIBC_TUNABLES` that already sets a
`glibc.malloc.*` tunable is the user's and is kept as it is. Nothing happens outside Linux with glibc.
"""

import os
import sys

XLA_CPU_FLAGS = '--xla_cpu_experimental_ynn_fusion_type=-reduce'
MALLOC_TUNABLES = 'glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1000000000000'
OPT_OUT = 'DIMASKDINO_MALLOC'  # 'system': leave glibc's malloc as it is


def with_cpu_flags(flags: str) -> str:
  """`flags` (an XLA_FLAGS value) with XLA_CPU_FLAGS added unless it already sets the YNN fusion type: for processes
  that keep a caller's XLA_FLAGS but need the tuned fusion too (the test run, benchmarks/msda.py)."""
  return flags if 'ynn_fusion_type' in flags else f'{flags} {XLA_CPU_FLAGS}'.strip()


def glibc_version() -> tuple[int, int] | None:
  """(major, minor) of the running glibc, or None (not Linux, or another C library such as musl)."""
  try:
    name, version = os.confstr('CS_GNU_LIBC_VERSION').split()  # e.g. 'glibc 2.36'
    major, minor = version.split('.')[:2]
    return (int(major), int(minor)) if name == 'glibc' else None
  except (AttributeError, ValueError, OSError):  # no confstr name on this platform, or an unexpected answer
    return None


def _sets_malloc(tunables: str) -> bool:
  """Whether a GLIBC_TUNABLES value sets any malloc tunable (ours after a restart, or the user's)."""
  return 'glibc.malloc.' in tunables


def malloc_environment(environ: dict[str, str], glibc: tuple[int, int] | None) -> dict[str, str] | None:
  """The environment to restart with for the malloc tunables, or None where the process should run as it is:
  not glibc, opted out, or `GLIBC_TUNABLES` already setting malloc (ours after a restart, or the user's)."""
  if glibc is None or environ.get(OPT_OUT, '').lower() == 'system':
    return None
  current = environ.get('GLIBC_TUNABLES', '')
  if _sets_malloc(current):
    return None
  env = dict(environ)
  env['GLIBC_TUNABLES'] = f'{current}:{MALLOC_TUNABLES}' if current else MALLOC_TUNABLES
  return env


def configure(restart: bool = True) -> None:
  """Sets the XLA_FLAGS default and, with `restart`, starts this command again with the malloc tunables when they
  are not in effect (see the module docstring). Call it first in a `__main__` script, before jax is imported: the
  restart replaces the process, so anything done before it is done twice."""
  os.environ.setdefault('XLA_FLAGS', XLA_CPU_FLAGS)
  if not restart:
    return
  env = malloc_environment(dict(os.environ), glibc_version())
  if env is None or not sys.executable:  # an embedded interpreter has no executable to start again
    return
  argv = list(getattr(sys, 'orig_argv', None) or [sys.executable, *sys.argv])  # orig_argv keeps `-m module`
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, argv, env)
  except OSError as e:  # the command goes on with glibc's defaults: slower, never wrong
    print(f'dimaskdino_jax.runtime: could not restart with {MALLOC_TUNABLES} ({e}); glibc defaults', file=sys.stderr)


def describe_malloc() -> str:
  """This process's malloc settings in words, for benchmark records."""
  tunables = os.environ.get('GLIBC_TUNABLES', '')
  if glibc_version() is None:
    return 'not glibc'
  return f'glibc tunables {tunables}' if _sets_malloc(tunables) else 'glibc defaults'


def main(argv: list[str]) -> None:
  """`python -m dimaskdino_jax.runtime COMMAND [ARGS ...]`: runs COMMAND with the malloc tunables where `configure`
  would restart with them (the Makefile's test run: pytest and its workers are not entry points)."""
  if not argv:
    raise SystemExit('usage: python -m dimaskdino_jax.runtime COMMAND [ARGS ...]')
  env = malloc_environment(dict(os.environ), glibc_version()) or dict(os.environ)
  env.setdefault('XLA_FLAGS', XLA_CPU_FLAGS)
  os.execvpe(argv[0], argv, env)


if __name__ == '__main__':
  main(sys.argv[1:])
