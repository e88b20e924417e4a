"""The training loop: one jitted step (forward, losses, AdamW update) with donation, metrics, checkpoints.

`train(config, workdir)` resumes automatically from the newest complete checkpoint in WORKDIR (params,
optimizer, step, data-iterator position, RNG) and writes WORKDIR/metrics.jsonl, TensorBoard events and
WORKDIR/config.json. The state is a plain dict pytree:
  {'step': () int32, 'params': ..., 'frozen_bn': FrozenBN buffers, 'opt_state': ..., 'rng': PRNG key}.
"""

import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics as clu_metrics
from clu import parameter_overview

from dimaskdino_jax.convert.init import load_initial_weights
from dimaskdino_jax.losses.criterion import compute_losses
from dimaskdino_jax.modeling.model import build_model
from dimaskdino_jax.training import optimizer as optim_lib
from dimaskdino_jax.training import partition
from dimaskdino_jax.training.checkpoint import Checkpointer, abstract_state
from dimaskdino_jax.training.writers import MetricWriter, ProgressBar

log = logging.getLogger(__name__)

TARGET_KEYS = ('boxes', 'labels', 'valid', 'masks')


def abstract_params(model, image_shape):
  """The model's param tree as ShapeDtypeStructs for images of `image_shape` (no FLOPs spent)."""
  return jax.eval_shape(
    lambda i: model.init({'params': jax.random.key(0), 'dn': jax.random.key(1)}, i),
    jax.ShapeDtypeStruct(image_shape, jnp.uint8),
  )['params']


def init_state(config, model, tx, image_shape):
  """Fresh train state for images of `image_shape` (B, H, W, 3)."""
  rng = jax.random.key(int(config.seed))
  k_init, k_dn, k_train = jax.random.split(rng, 3)
  images = jnp.zeros(image_shape, jnp.uint8)
  variables = jax.jit(lambda i: model.init({'params': k_init, 'dn': k_dn}, i))(images)
  params = variables['params']
  return {
    'step': jnp.zeros((), jnp.int32),
    'params': params,
    'frozen_bn': variables.get('frozen_bn', {}),
    'opt_state': tx.init(partition.trainable_params(config, params)),  # trainable leaves only
    'rng': k_train,
  }


def make_metrics_class(names):
  """A clu Collection averaging each named scalar over the steps between two log lines."""
  return clu_metrics.Collection.create(**{n: clu_metrics.Average.from_output(n) for n in names})


def make_train_step(config, model, tx):
  """(state, batch) -> (state, scalars dict). Jit it with donate_argnums=0.

  Only the parameters selected by config.train.trainable are differentiated and updated (partition.py); the
  others are closed over behind stop_gradient and returned unchanged.
  """
  predicate = partition.trainable_predicate(config)

  def step_fn(state, batch):
    rng = jax.random.fold_in(state['rng'], state['step'])
    k_dn, k_loss = jax.random.split(rng)
    targets = {k: batch[k] for k in TARGET_KEYS if k in batch}

    trainable, frozen = partition.split_params(state['params'], predicate)

    def loss_fn(trainable):
      params = partition.merge_params(trainable, jax.lax.stop_gradient(frozen))
      preds = model.apply(
        {'params': params, 'frozen_bn': state['frozen_bn']}, batch['image'], targets, train=True, rngs={'dn': k_dn}
      )
      total, terms = compute_losses(preds, targets, k_loss, config)
      return total, terms

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, state['opt_state'], trainable)
    params = partition.merge_params(optax.apply_updates(trainable, updates), frozen)
    scalars = {'loss': loss, 'grad_norm': optax.global_norm(grads), **terms}
    scalars['lr'] = optim_lib.learning_rate(opt_state)
    new_state = {**state, 'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}
    return new_state, scalars

  return step_fn


_STEP_CACHE = {}


def compiled_train_step(config, model, tx):
  """The jitted step for (config, model), reused across train() calls in one process (resume tests, sweeps)."""
  sections = {k: v for k, v in config.to_dict().items() if k not in ('train', 'eval', 'data')}
  key = (repr(sorted(sections.items())), str(config.train.get('trainable', 'all')), model)
  if key not in _STEP_CACHE:
    _STEP_CACHE.clear()  # keep one: a step holds its compiled executables
    _STEP_CACHE[key] = jax.jit(make_train_step(config, model, tx), donate_argnums=0)
  return _STEP_CACHE[key]


def batch_to_device(batch):
  return {k: jnp.asarray(v) for k, v in batch.items() if k in ('image', *TARGET_KEYS)}


def train(config, workdir, *, data_iterator=None, verbose=True):
  """Trains `config` in `workdir` until config.train.num_steps; returns the final state (host arrays)."""
  from dimaskdino_jax.data.pipeline import make_train_iterator
  from dimaskdino_jax.data.prepare import ensure_shapes_dataset

  os.makedirs(workdir, exist_ok=True)
  ensure_shapes_dataset(config)
  model = build_model(config)
  it = data_iterator if data_iterator is not None else make_train_iterator(config)
  t = config.train
  image_shape = (t.batch_size // jax.process_count(), config.data.image_size, config.data.image_size, 3)

  # The optimizer needs the param tree (shapes only); restore into the abstract state, or initialize.
  tx = optim_lib.build_optimizer(config, partition.trainable_params(config, abstract_params(model, image_shape)))
  ckpt = Checkpointer(workdir, config)
  state_shape = jax.eval_shape(lambda: init_state(config, model, tx, image_shape))
  restored = ckpt.restore_latest(abstract_state(state_shape), data_iterator=it)
  if restored is not None:
    state = restored['state']
    if verbose:
      print(f'Resumed from {ckpt.directory} at step {int(state["step"])}', flush=True)
  else:
    state = init_state(config, model, tx, image_shape)
    state = load_initial_weights(config, state, verbose=verbose)  # train.init_checkpoint / backbone.weights

  if verbose and jax.process_index() == 0:
    print(parameter_overview.get_parameter_overview(state['params'], include_stats=False).splitlines()[-1], flush=True)
    groups = optim_lib.group_summary(partition.trainable_params(config, state['params']))
    if partition.trainable_predicate(config) is not None:
      print(partition.describe(config, state['params']), flush=True)
    print('optimizer groups: ' + ', '.join(f'{k}: {v[1]:,}' for k, v in sorted(groups.items())), flush=True)

  step_fn = compiled_train_step(config, model, tx)
  start = int(state['step'])
  writer = MetricWriter(workdir, start_step=start)
  bar = ProgressBar(t.num_steps, initial=start, enabled=verbose and jax.process_index() == 0)
  metrics_cls = None
  acc = None
  last_log = time.time()
  step = start
  # The data state saved with a checkpoint is the state after the batches consumed so far: the next batch is
  # fetched only after saving.
  while step < t.num_steps:
    batch = next(it)
    state, scalars = step_fn(state, batch_to_device(batch))
    step += 1
    if metrics_cls is None:
      metrics_cls = make_metrics_class(sorted(scalars))
    update = metrics_cls.single_from_model_output(**scalars)
    acc = update if acc is None else acc.merge(update)
    if step % t.log_every == 0 or step == t.num_steps:
      values = {k: float(np.asarray(v)) for k, v in acc.compute().items()}
      now = time.time()
      values['steps_per_sec'] = t.log_every / max(now - last_log, 1e-9) if step % t.log_every == 0 else float('nan')
      last_log = now
      writer.write_scalars(step, values)
      bar.update(step, loss=values['loss'])
      if not np.isfinite(values['loss']):
        log.warning('step %d: non-finite loss %s', step, values['loss'])
      acc = None
    else:
      bar.update(step)
    if step % t.checkpoint_every == 0 or step == t.num_steps:
      ckpt.save(step, state, data=it)
  ckpt.wait_until_finished()
  bar.close()
  writer.close()
  ckpt.close()
  return state
