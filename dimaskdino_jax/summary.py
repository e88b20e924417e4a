"""Parameter overview of a config's model without running it (shape evaluation only).

  python -m dimaskdino_jax.summary --config configs/dimaskdino_r50_coco.py[:variant]

Prints clu's parameter table and, last, a line `total_params: N` (trainable parameters; FrozenBN buffers are
not parameters).
"""

import argparse

from dimaskdino_jax import runtime  # noqa: E402

runtime.configure(restart=__name__ == '__main__')  # XLA_FLAGS; malloc tunables (a restart) as a script

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from clu import parameter_overview  # noqa: E402

from dimaskdino_jax.config import load_config  # noqa: E402
from dimaskdino_jax.modeling.model import build_model  # noqa: E402


def abstract_variables(config, canvas=None):
  """Shape-only variables of the model for a config (no FLOPs spent)."""
  model = build_model(config)
  size = canvas or config.data.image_size
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.uint8)
  return jax.eval_shape(lambda i: model.init({'params': jax.random.key(0)}, i), images)


def count_params(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', required=True, help='configs/NAME.py[:variant]')
  parser.add_argument('--max-lines', type=int, default=0, help='truncate the table (0 = all rows)')
  args = parser.parse_args(argv)
  config = load_config(args.config)
  variables = abstract_variables(config)
  params = variables['params']
  table = parameter_overview.get_parameter_overview(params, include_stats=False)
  lines = table.splitlines()
  if args.max_lines and len(lines) > args.max_lines:
    lines = lines[: args.max_lines] + [f'... ({len(lines) - args.max_lines} more rows)']
  print('\n'.join(lines))
  for name, sub in params.items():
    print(f'{name}: {count_params(sub)}')
  print(f'total_params: {count_params(params)}')


if __name__ == '__main__':
  main()
