"""Cost of a cross-process all-reduce on CPU (gloo) as one array vs as many arrays (a gradient pytree).

  python benchmarks/cpu_allreduce.py [--arrays 1,450] [--floats 1400000]

Starts two processes on 127.0.0.1 (`jax.distributed`, one CPU device each, pinned one per core when the machine has
two or more), sums `--floats` float32 numbers across them split into N equal arrays (XLA's combiner turns the N
all-reduces into a few tuple all-reduces), and prints the median of 10 calls and the number of all-reduce ops in
the compiled program. The shapes config's gradient is ~1.4 M floats in ~450 leaves.
"""

import argparse
import os
import socket
import subprocess
import sys
import time


def worker(pid: int, port: int, n_arrays: int, floats: int) -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  jax.distributed.initialize(f'127.0.0.1:{port}', 2, pid)
  mesh = jax.make_mesh((2,), ('d',))
  local = np.ones((1, floats // n_arrays), np.float32)  # this process's row of each (2, n) array
  xs = [jax.make_array_from_process_local_data(NamedSharding(mesh, P('d')), local) for _ in range(n_arrays)]
  f = jax.jit(lambda xs: [jnp.sum(x, 0) for x in xs], out_shardings=NamedSharding(mesh, P()))
  jax.block_until_ready(f(xs))
  times = []
  for _ in range(10):
    t0 = time.perf_counter()
    jax.block_until_ready(f(xs))
    times.append(time.perf_counter() - t0)
  if pid == 0:
    ops = f.lower(xs).compile().as_text().count(' all-reduce(')
    print(f'{floats} floats as {n_arrays} array(s), {ops} all-reduce op(s): median {np.median(times) * 1e3:.1f} ms')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--arrays', default='1,450', help='comma-separated array counts')
  parser.add_argument('--floats', type=int, default=1_400_000)
  parser.add_argument('--worker', type=int, nargs=2, help=argparse.SUPPRESS)  # internal: pid port
  parser.add_argument('--n', type=int, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker(args.worker[0], args.worker[1], args.n, args.floats)
    return
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  cores = os.cpu_count() or 1
  for n in (int(a) for a in args.arrays.split(',')):
    with socket.socket() as s:
      s.bind(('127.0.0.1', 0))
      port = s.getsockname()[1]
    procs = []
    for pid in (0, 1):
      cmd = [sys.executable, __file__, '--worker', str(pid), str(port), '--n', str(n), '--floats', str(args.floats)]
      if cores >= 2:
        cmd = ['taskset', '-c', str(pid)] + cmd
      procs.append(subprocess.Popen(cmd, env=env))
    for p in procs:
      if p.wait() != 0:
        raise SystemExit(f'worker exited with {p.returncode}')


if __name__ == '__main__':
  main()
