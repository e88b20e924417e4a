"""Bitwise guard for refactors that must not change behaviour: prints one line per quantity, compare two runs.

    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-reduce .venv/bin/python benchmarks/bitwise_guard.py > before.txt
    ... change the code ...
    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-reduce .venv/bin/python benchmarks/bitwise_guard.py > after.txt
    diff before.txt after.txt   # must print nothing

What it records, on the CPU, with fixed seeds:
* the param tree (every path and shape, by jax.eval_shape) of configs/shapes.py, configs/dimaskdino_r50_coco.py and
  the tiny test config (tests/tiny.py) in both formulations;
* 5 training steps (trainer.make_train_step, AdamW) of the tiny config on generated data, official and paper
  formulations: every named loss term of every step as float32 hex, and a SHA-256 of the final params;
* the model's outputs (all of Predictions, extras included) on a fixed input, for both formulations and the
  ablation switches, in training mode with DN targets and in inference mode: a SHA-256 per output leaf.

Part of the tiny config runs with the tests' fast XLA options (tests/tiny.py FAST); both runs use the same ones,
so the comparison is exact. `--quick` skips the ablation switches; `--only=NAME` runs only the outputs of
the named variants.
"""

import hashlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dimaskdino_jax.config import load_config  # noqa: E402
from dimaskdino_jax.modeling.model import build_model  # noqa: E402
from tests.tiny import CANVAS, FAST, tiny_config  # noqa: E402

VARIANTS = [
  ('official', {}),
  ('paper', {'model.formulation': 'paper'}),
  ('no_di', {'model.di.enabled': False, 'model.di.selection_ks': (12,)}),
  ('no_bato', {'model.bato.enabled': False}),
  ('maskdino', {'model.di.enabled': False, 'model.di.selection_ks': (12,), 'model.bato.enabled': False}),
  ('no_gtg', {'model.bato.guiding_token_generation': False}),
  ('paper_no_gtg', {'model.formulation': 'paper', 'model.bato.guiding_token_generation': False}),
  ('guidance_T_i', {'model.bato.guidance': 'T_i'}),
  ('guidance_T_s1', {'model.bato.guidance': 'T_s1'}),
  ('guidance_T_s2', {'model.bato.guidance': 'T_s2'}),
  ('paper_Q_bal', {'model.formulation': 'paper', 'model.bato.guidance': 'Q_bal'}),
  ('decoder0', {'model.bato.guidance': 'decoder0', 'model.bato.layer': 1}),
  ('random_pos', {'model.di.random_position_tokens': True, 'model.bato.guidance': 'Q_bal'}),
  ('selections_3', {'model.di.selection_ks': (24, 18, 12)}),
  ('box_mask2box', {'model.decoder.box_init': 'mask2box'}),  # the tiny config (from configs/shapes.py) uses 'none'
  ('paper_mask2box', {'model.formulation': 'paper', 'model.decoder.box_init': 'mask2box'}),
  ('box_bitmask', {'model.decoder.box_init': 'bitmask'}),
  ('no_dn', {'model.dn.mode': 'none'}),
  ('no_initial_pred', {'model.decoder.initial_pred': False}),
]


def digest(x) -> str:
  return hashlib.sha256(np.ascontiguousarray(np.asarray(x)).tobytes()).hexdigest()[:16]


def tree_lines(prefix, tree):
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    yield f'{prefix} {jax.tree_util.keystr(path)} {tuple(leaf.shape)} {leaf.dtype}'


def param_trees():
  configs = [
    ('shapes', load_config('configs/shapes.py')),
    ('r50_coco', load_config('configs/dimaskdino_r50_coco.py')),
    ('tiny', tiny_config()),
    ('tiny_paper', tiny_config(**{'model.formulation': 'paper'})),
    ('tiny_random_pos', tiny_config(**{'model.di.random_position_tokens': True})),
  ]
  for name, config in configs:
    model = build_model(config)
    size = config.data.image_size
    shape = jax.ShapeDtypeStruct((1, size, size, 3), jnp.uint8)
    rngs = {'params': jax.random.key(0), 'dn': jax.random.key(1)}
    variables = jax.eval_shape(lambda images, m=model, r=rngs: m.init(r, images), shape)
    yield from tree_lines(f'tree {name}', variables)


def fixed_batch(b=2, g=4):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (b, CANVAS, CANVAS, 3)).astype(np.uint8)
  valid = np.zeros((b, g), bool)
  valid[0, :3] = True
  valid[1, :1] = True
  centres = rng.uniform(0.3, 0.7, (b, g, 2))
  sizes = rng.uniform(0.1, 0.3, (b, g, 2))
  boxes = np.concatenate([centres, sizes], -1).astype(np.float32)
  labels = rng.integers(0, 3, (b, g)).astype(np.int32)
  ys, xs = np.meshgrid((np.arange(CANVAS) + 0.5) / CANVAS, (np.arange(CANVAS) + 0.5) / CANVAS, indexing='ij')
  masks = (np.abs(xs - centres[..., 0, None, None]) < sizes[..., 0, None, None] / 2) & (
    np.abs(ys - centres[..., 1, None, None]) < sizes[..., 1, None, None] / 2
  )
  masks = (masks & valid[..., None, None]).astype(np.uint8)
  return {'image': images, 'boxes': boxes, 'labels': labels, 'valid': valid, 'masks': masks}


def outputs(name, config):
  model = build_model(config)
  batch = fixed_batch()
  targets = {k: jnp.asarray(batch[k]) for k in ('boxes', 'labels', 'valid')}

  def run(images, targets):
    variables = model.init({'params': jax.random.key(0), 'dn': jax.random.key(1)}, images, targets, train=True)
    train = model.apply(variables, images, targets, train=True, rngs={'dn': jax.random.key(5)})
    infer = model.apply(variables, images)
    return variables, train, infer

  compiled = jax.jit(run).lower(jnp.asarray(batch['image']), targets).compile(compiler_options=FAST)
  variables, train, infer = compiled(jnp.asarray(batch['image']), targets)
  for label, tree in (('init', variables), ('train', train), ('infer', infer)):
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      yield f'out {name} {label} {jax.tree_util.keystr(path)} {tuple(leaf.shape)} {digest(leaf)}'


def training(name, config):
  from dimaskdino_jax.training import optimizer as optim_lib
  from dimaskdino_jax.training import partition
  from dimaskdino_jax.training.trainer import abstract_params, init_state, make_train_step

  config.train.batch_size = 2
  model = build_model(config)
  batch = {k: jnp.asarray(v) for k, v in fixed_batch().items()}
  abstract = partition.trainable_params(config, abstract_params(model, batch['image'].shape))
  tx = optim_lib.build_optimizer(config, abstract)
  state = init_state(config, model, tx, batch['image'].shape)
  step = jax.jit(make_train_step(config, model, tx))
  for i in range(5):
    state, scalars = step(state, batch)
    for key in sorted(scalars):
      value = np.float32(scalars[key])
      yield f'train {name} step {i} {key} {value.view(np.uint32):08x} {value!r}'
  yield f'train {name} params {digest(np.concatenate([np.ravel(x) for x in jax.tree.leaves(state["params"])]))}'


def main():
  quick = '--quick' in sys.argv
  only = [a.split('=', 1)[1] for a in sys.argv[1:] if a.startswith('--only=')]  # output variants only, by name
  if not only:
    for line in param_trees():
      print(line, flush=True)
    for name, overrides in [VARIANTS[0], VARIANTS[1]]:
      for line in training(name, tiny_config(**overrides)):
        print(line, flush=True)
  for name, overrides in VARIANTS[:2] if quick else VARIANTS:
    if only and name not in only:
      continue
    for line in outputs(name, tiny_config(**overrides)):
      print(line, flush=True)


if __name__ == '__main__':
  main()
