"""Initial weights for a fresh training run: a converted / earlier checkpoint (fine-tuning) or an ImageNet backbone.

* `config.train.init_checkpoint`: a workdir, checkpoints directory or step directory (e.g. the OUT of
  `python -m dimaskdino_jax.convert`): all model variables ('params', 'frozen_bn') are restored from it, strictly
  (the model of the config must match). The optimizer starts fresh at step 0.
* `config.model.backbone.weights`: a torchvision ResNet `.pth` or detectron2 `R-50.pkl`; only the backbone is
  replaced (FrozenBN statistics included), the rest keeps its random initialization.

Both apply only when the run starts from scratch: resuming from WORKDIR's own checkpoints ignores them.
"""

import jax
import jax.numpy as jnp

from dimaskdino_jax.training.checkpoint import resolve_checkpoint, restore_variables


def _like(new, old):
  """`new` (numpy tree) with the dtypes (and shardings, when placed) of `old`."""

  def one(n, o):
    x = jnp.asarray(n, dtype=o.dtype)
    sharding = getattr(o, 'sharding', None)
    return jax.device_put(x, sharding) if sharding is not None else x

  return jax.tree.map(one, new, old)


def load_initial_weights(config, state, verbose=True):
  """`state` ({'params', 'frozen_bn', ...}) with the initial weights the config asks for (or unchanged)."""
  init_ckpt = str(config.train.get('init_checkpoint', '') or '')
  weights = str(config.model.backbone.get('weights', '') or '')
  if init_ckpt:
    step_dir, _ = resolve_checkpoint(checkpoint=init_ckpt)
    variables = restore_variables(config, step_dir)
    state = {
      **state,
      'params': _like(variables['params'], state['params']),
      'frozen_bn': _like(variables.get('frozen_bn', {}), state['frozen_bn']),
    }
    if verbose:
      print(f'initialized all model weights from {step_dir}', flush=True)
  elif weights:
    from dimaskdino_jax.convert.torch_checkpoint import convert_backbone, read_state_dict

    shapes = {
      'params': {'backbone': state['params']['backbone']},
      'frozen_bn': {'backbone': state['frozen_bn'].get('backbone', {})},
    }
    backbone = convert_backbone(read_state_dict(weights), config, source=weights, shapes=shapes)
    params = {**state['params'], 'backbone': _like(backbone['params']['backbone'], state['params']['backbone'])}
    frozen = dict(state['frozen_bn'])
    frozen['backbone'] = _like(backbone['frozen_bn']['backbone'], state['frozen_bn']['backbone'])
    state = {**state, 'params': params, 'frozen_bn': frozen}
    if verbose:
      print(f'initialized the backbone from {weights}', flush=True)
  return state
