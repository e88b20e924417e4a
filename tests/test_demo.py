"""The schedule rescaling that `python -m dimaskdino_jax.demo --steps N` uses (the full demo is `make demo`, too slow
for the suite)."""

from dimaskdino_jax.analysis.runner import set_num_steps
from dimaskdino_jax.config import load_config


def test_set_num_steps_moves_lr_drops_proportionally():
  c = load_config('configs/shapes.py')
  n, drops = c.train.num_steps, tuple(c.optim.lr_drop_steps)
  set_num_steps(c, 2 * n)
  assert c.train.num_steps == 2 * n
  assert tuple(c.optim.lr_drop_steps) == tuple(2 * d for d in drops)
