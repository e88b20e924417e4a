"""The training loop: one jitted step (forward, losses, AdamW update) with donation, metrics, checkpoints.

`train(config, workdir)` resumes automatically from the newest complete checkpoint in WORKDIR (params,
optimizer, step, data-iterator position, RNG) and writes WORKDIR/metrics.jsonl, TensorBoard events and
WORKDIR/config.json. The state is a plain dict pytree:
  {'step': () int32, 'params': ..., 'frozen_bn': FrozenBN buffers, 'opt_state': ..., 'rng': PRNG key,
   'nonfinite': {'consecutive': () int32, 'total': () int32}}.

Reliability (README, "Resuming, preemption and the NaN guard"):
* Determinism: the step's randomness is fold_in(rng, step) and the data order is the grain iterator's position, both
  in the checkpoint, so a resumed run computes what the uninterrupted one would have (bitwise on CPU with the same
  jax/jaxlib, XLA_FLAGS and device count; tests/training/test_reliability.py kills runs with SIGKILL to check it).
* SIGTERM / SIGINT: the step in flight finishes, a checkpoint of that step is written, and `train` raises
  `TrainingInterrupted` (train.py prints how to resume and exits with 128 + the signal number). A second signal
  while saving has its default effect.
* Non-finite loss or gradients: inside the jitted step the update is skipped (params and optimizer state kept, so
  the learning-rate schedule does not advance either) and counted in state['nonfinite']; the host warns with the
  non-finite loss terms, writes no periodic checkpoint during a streak (the last good one is kept), and after
  config.train.max_consecutive_nonfinite consecutive skips raises `NonFiniteError` naming the steps and terms.
* The workdir is checked for writability and free space (one checkpoint) before compiling; failed checkpoint writes
  raise `CheckpointError` and leave no checkpoint that a resume would pick (training/checkpoint.py).
"""

import logging
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics as clu_metrics
from clu import parameter_overview
from jax.flatten_util import ravel_pytree
from jax.sharding import PartitionSpec

from dimaskdino_jax.convert.init import check_initial_weights, load_initial_weights
from dimaskdino_jax.losses.criterion import compute_losses, draws_mask_points
from dimaskdino_jax.modeling.denoising import draw_dn_noise, max_gt_count
from dimaskdino_jax.modeling.model import build_model
from dimaskdino_jax.training import optimizer as optim_lib
from dimaskdino_jax.training import partition, sharding
from dimaskdino_jax.training.checkpoint import (
  Checkpointer,
  abstract_state,
  check_workdir,
  state_nbytes,
)
from dimaskdino_jax.training.periodic_eval import PeriodicEvaluation, check_eval_split
from dimaskdino_jax.training.writers import MetricWriter, ProgressBar

log = logging.getLogger(__name__)

TARGET_KEYS = ('boxes', 'labels', 'valid', 'masks')


def abstract_params(model, image_shape):
  """The model's param tree as ShapeDtypeStructs for images of `image_shape` (no FLOPs spent)."""
  return jax.eval_shape(
    lambda i: model.init({'params': jax.random.key(0), 'dn': jax.random.key(1)}, i),
    jax.ShapeDtypeStruct(image_shape, jnp.uint8),
  )['params']


class TrainingInterrupted(Exception):
  """SIGTERM / SIGINT: a checkpoint of `step` was written; rerunning the same command resumes from it."""

  def __init__(self, signum: int, step: int, directory: str):
    self.signum, self.step, self.directory = int(signum), int(step), directory
    name = signal.Signals(self.signum).name
    super().__init__(
      f'{name} received: stopped after step {self.step} and saved checkpoint {self.step} in {directory}. '
      'Rerun the same command (same --config, overrides and --workdir) to resume from it.'
    )


class NonFiniteError(RuntimeError):
  """Too many consecutive non-finite updates; the message names the steps and the non-finite loss terms."""


_INIT_CACHE = {}


def _jitted_init(model):
  """jit(model.init) per model: reused by every train() call in one process (one compilation)."""
  if model not in _INIT_CACHE:
    _INIT_CACHE.clear()
    _INIT_CACHE[model] = jax.jit(lambda k_init, k_dn, i: model.init({'params': k_init, 'dn': k_dn}, i))
  return _INIT_CACHE[model]


def init_state(config, model, tx, image_shape):
  """Fresh train state for images of `image_shape` (B, H, W, 3)."""
  rng = jax.random.key(int(config.seed))
  k_init, k_dn, k_train = jax.random.split(rng, 3)
  images = jnp.zeros(image_shape, jnp.uint8)
  variables = _jitted_init(model)(k_init, k_dn, images)
  params = variables['params']
  return {
    'step': jnp.zeros((), jnp.int32),
    'params': params,
    'frozen_bn': variables.get('frozen_bn', {}),
    'opt_state': tx.init(partition.trainable_params(config, params)),  # trainable leaves only
    'rng': k_train,
    'nonfinite': {'consecutive': jnp.zeros((), jnp.int32), 'total': jnp.zeros((), jnp.int32)},
  }


class MetricAverages:
  """Averages each named scalar over the steps between two log lines, as clu `Average` metrics on the host.

  The step's scalars arrive as numpy values (one device -> host transfer per step). Building clu metrics from
  device arrays instead (`Collection.single_from_model_output`) dispatches a few eager ops per scalar: ~130 ms
  per step for the ~55 loss terms of the shapes config, more than a quarter of its step (measured, BENCHMARKS.md).
  """

  def __init__(self):
    self.metrics = {}

  def add(self, values):
    for k, v in values.items():
      update = clu_metrics.Average(total=np.asarray(v, np.float64), count=np.asarray(1, np.int64))
      self.metrics[k] = self.metrics[k].merge(update) if k in self.metrics else update

  def compute(self):
    return {k: float(m.compute()) for k, m in self.metrics.items()}


class DataCounts:
  """Counts of what the input pipeline had to give up, summed over this process's batches.

  `record_errors`: records that could not be decoded and became blank examples (batch['record_error']);
  `instances_dropped`: instances beyond data.max_instances (batch['num_dropped']). Logged per log interval in
  metrics.jsonl (`data_record_errors`, `data_instances_dropped`) and summed for this run in a closing line.
  """

  KEYS = (('record_error', 'data_record_errors'), ('num_dropped', 'data_instances_dropped'))

  def __init__(self):
    self.since_log = dict.fromkeys((name for _, name in self.KEYS), 0)
    self.total = dict(self.since_log)

  def add(self, batch):
    for key, name in self.KEYS:
      if key in batch:
        n = int(np.asarray(batch[key]).sum())
        self.since_log[name] += n
        self.total[name] += n

  def interval(self):
    out, self.since_log = self.since_log, dict.fromkeys(self.since_log, 0)
    return out

  def report(self):
    if any(self.total.values()):
      print(
        f'input pipeline, this run: {self.total["data_record_errors"]} undecodable records trained on as blank '
        f'examples, {self.total["data_instances_dropped"]} instances beyond data.max_instances dropped',
        flush=True,
      )


def make_train_step(config, model, tx):
  """(state, batch) -> (state, scalars dict). Jit it with donate_argnums=0.

  Only the parameters selected by config.train.trainable are differentiated and updated (partition.py); the
  others are closed over behind stop_gradient and returned unchanged.
  """
  predicate = partition.trainable_predicate(config)

  def losses_and_grads(trainable, frozen, frozen_bn, image, targets, k_loss, num_masks):
    """((loss, terms), grads) of the batch (or of one data shard, with the whole batch's `num_masks`)."""

    def loss_fn(trainable):
      params = partition.merge_params(trainable, jax.lax.stop_gradient(frozen))
      preds = model.apply({'params': params, 'frozen_bn': frozen_bn}, image, targets, train=True)
      return compute_losses(preds, targets, k_loss, config, num_masks_override=num_masks)

    return jax.value_and_grad(loss_fn, has_aux=True)(trainable)

  def step_fn(state, batch):
    rng = jax.random.fold_in(state['rng'], state['step'])
    k_dn, k_loss = jax.random.split(rng)
    targets = {k: batch[k] for k in TARGET_KEYS if k in batch}
    targets.update(dn_draws(config, targets['valid'], k_dn))
    num_masks = jnp.sum(targets['valid']).astype(jnp.float32)  # the whole batch's GT count (clamped >= 1 there)

    trainable, frozen = partition.split_params(state['params'], predicate)
    args = (trainable, frozen, state['frozen_bn'], batch['image'], targets, k_loss, num_masks)
    if flat_gradient_sum(config):
      (loss, terms), grads = _per_shard_with_flat_sum(losses_and_grads, *args)
    else:
      (loss, terms), grads = losses_and_grads(*args)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)  # the norm is NaN / inf iff a gradient is
    updates, opt_state = tx.update(grads, state['opt_state'], trainable)
    new_trainable = optax.apply_updates(trainable, updates)
    # The NaN guard: a non-finite step keeps the previous params and optimizer state (counted, never applied).
    new_trainable, opt_state = jax.tree.map(
      lambda new, old: jnp.where(finite, new, old), (new_trainable, opt_state), (trainable, state['opt_state'])
    )
    params = partition.merge_params(new_trainable, frozen)
    bad = jnp.logical_not(finite).astype(jnp.int32)
    nonfinite = {
      'consecutive': (state['nonfinite']['consecutive'] + 1) * bad,
      'total': state['nonfinite']['total'] + bad,
    }
    scalars = {'loss': loss, 'grad_norm': grad_norm, **terms, 'skipped': bad.astype(jnp.float32)}
    scalars['lr'] = optim_lib.learning_rate(opt_state)
    new_state = {
      **state,
      'step': state['step'] + 1,
      'params': params,
      'opt_state': opt_state,
      'nonfinite': nonfinite,
    }
    return new_state, scalars

  return step_fn


def dn_draws(config, valid, key):
  """The DN inputs that depend on the whole batch, drawn once for it: {'dn_noise': DnNoise (B, S, ...), 'dn_max_gt':
  () int32} for the model's targets, {} without DN. valid (B, G) bool; key: the step's DN key."""
  dn = config.model.dn
  if dn.mode == 'none' or int(dn.num) <= 0:
    return {}
  shape = (valid.shape[0], int(dn.num))
  noise = draw_dn_noise(key, shape, int(config.model.num_classes), float(dn.noise_scale))
  return {'dn_noise': noise, 'dn_max_gt': max_gt_count(valid)}


def flat_gradient_sum(config) -> bool:
  """Whether the step (traced under a mesh) computes each data shard's losses and gradients in a `shard_map` and
  sums the gradients in ONE all-reduce of a flat vector: when the mesh's data axis has more than one device and
  the losses draw no random points (loss.num_points and matcher.num_points 0, or no mask losses), whose draws
  depend on the shape of the batch they are drawn for.

  Else XLA partitions the step and sums each parameter's gradient where it is formed: one all-reduce operand
  per parameter leaf (283 for configs/shapes.py). Across processes on CPUs (gloo) each operand costs a fixed
  latency: two processes of the demo's config, one core each, spent 1.7 s of a 2.0 s step in those all-reduces,
  against ~10 ms for one flat vector of the same 1.4 M numbers (BENCHMARKS.md, session 20).
  """
  return sharding.data_size() > 1 and not draws_mask_points(config)


def _per_shard_with_flat_sum(losses_and_grads, trainable, frozen, frozen_bn, image, targets, k_loss, num_masks):
  """`losses_and_grads` of each data shard (its rows of image and targets; the rest replicated) in a shard_map,
  then the loss, the terms and the gradients summed over the shards, the gradients as one flat vector. The step's
  result for the whole batch up to summation order: every loss term is a sum over images divided by the whole
  batch's `num_masks`, and the DN draws came from `dn_draws` for the whole batch."""
  data, rep = PartitionSpec(sharding.DATA), PartitionSpec()
  target_specs = {k: rep if k == 'dn_max_gt' else jax.tree.map(lambda _: data, v) for k, v in targets.items()}

  def shard(trainable, frozen, frozen_bn, image, targets, k_loss, num_masks):
    # Varying over the shards before differentiating: each shard keeps its own gradient (no psum per leaf).
    trainable = jax.lax.pcast(trainable, sharding.DATA, to='varying')
    out = losses_and_grads(trainable, frozen, frozen_bn, image, targets, k_loss, num_masks)
    flat, unravel = ravel_pytree(out)  # ((loss, terms), grads): one float32 vector, one all-reduce operand
    return unravel(jax.lax.psum(flat, sharding.DATA))

  in_specs = (rep, rep, rep, data, target_specs, rep, rep)
  return jax.shard_map(shard, in_specs=in_specs, out_specs=rep)(
    trainable, frozen, frozen_bn, image, targets, k_loss, num_masks
  )


_STEP_CACHE = {}


def jit_train_step(config, model, tx, mesh):
  """The step jitted for `mesh`: state replicated, batch sharded on `data`, state donated; call it (and so trace
  it) under `jax.set_mesh(mesh)` (`run_step`) so the per-shard ops (matcher callback, deformable attention) see the
  mesh."""
  rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(
    make_train_step(config, model, tx), in_shardings=(rep, data), out_shardings=(rep, rep), donate_argnums=0
  )


def compiled_train_step(config, model, tx, mesh=None):
  """The jitted step for (config, model, mesh), reused across train() calls in one process (resume tests, sweeps)."""
  mesh = mesh if mesh is not None else sharding.make_mesh(config)
  sections = {k: v for k, v in config.to_dict().items() if k not in ('train', 'eval', 'data', 'mesh')}
  key = (repr(sorted(sections.items())), str(config.train.get('trainable', 'all')), model, mesh)
  if key not in _STEP_CACHE:
    while len(_STEP_CACHE) >= 3:  # keep three: a step holds its compiled executables
      _STEP_CACHE.pop(next(iter(_STEP_CACHE)))
    _STEP_CACHE[key] = jit_train_step(config, model, tx, mesh)
  return _STEP_CACHE[key]


def run_step(step_fn, mesh, state, batch):
  """One step on a host batch of this process (numpy; its rows of the global batch)."""
  with jax.set_mesh(mesh):
    return step_fn(state, sharding.shard_batch(batch_arrays(batch), mesh))


def batch_arrays(batch):
  """The entries of a pipeline batch that the step reads."""
  return {k: v for k, v in batch.items() if k in ('image', *TARGET_KEYS)}


def batch_to_device(batch):
  return {k: jnp.asarray(v) for k, v in batch.items() if k in ('image', *TARGET_KEYS)}


class _StopSignals:
  """Turns SIGTERM / SIGINT into a flag checked between steps (main thread only); a second signal, or one while
  the handlers are uninstalled, has its default effect."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    self.signum = signum
    log.warning('%s received: finishing the current step and saving a checkpoint', signal.Signals(signum).name)
    self.uninstall()  # a second signal interrupts the save

  def install(self):
    if threading.current_thread() is not threading.main_thread():
      return self
    for sig in self.SIGNALS:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def uninstall(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}


def nonfinite_names(scalars) -> list[str]:
  """Names of the non-finite entries of a step's scalars (loss terms, 'loss', 'grad_norm')."""
  return sorted(k for k, v in scalars.items() if k not in ('skipped', 'lr') and not np.isfinite(np.asarray(v)).all())


class RunSetup:
  """What one `train` call works with, built before any state exists (`prepare_run`).

  mesh: the device mesh; model: the Flax module; iterator: this process's share of every global batch (grain);
  tx: the optimizer (built from the param shapes); image_shape: (local batch, H, W, 3) of one step's input;
  state_shape: the train state as ShapeDtypeStructs.
  """

  def __init__(self, config, workdir, mesh, model, iterator, tx, image_shape, state_shape):
    self.config, self.workdir, self.mesh, self.model = config, workdir, mesh, model
    self.iterator, self.tx, self.image_shape, self.state_shape = iterator, tx, image_shape, state_shape


def prepare_run(config, workdir, data_iterator=None) -> RunSetup:
  """Checks the workdir (writable; room for one checkpoint), builds the mesh, the model, the data iterator and the
  optimizer. The synthetic shapes dataset is written first by process 0 when the config asks for it."""
  from dimaskdino_jax.data.pipeline import make_train_iterator
  from dimaskdino_jax.data.prepare import ensure_shapes_dataset

  check_workdir(workdir)
  mesh = sharding.make_mesh(config)
  local_batch = sharding.check_batch(config, mesh)
  risk = sharding.callback_deadlock_warning(config, mesh)
  if risk:
    log.warning(risk)
  if jax.process_index() == 0:
    ensure_shapes_dataset(config)
  if jax.process_count() > 1:  # the others wait for process 0 to write the synthetic dataset
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices('dimaskdino_dataset_ready')
  model = build_model(config)
  iterator = data_iterator
  if iterator is None:  # this process's share of every global batch (pipeline.py: sharding by process)
    iterator = make_train_iterator(config, shard_index=jax.process_index(), shard_count=jax.process_count())
  image_shape = (local_batch, config.data.image_size, config.data.image_size, 3)
  # The optimizer needs the param tree (shapes only).
  tx = optim_lib.build_optimizer(config, partition.trainable_params(config, abstract_params(model, image_shape)))
  state_shape = jax.eval_shape(lambda: init_state(config, model, tx, image_shape))
  check_workdir(workdir, state_nbytes(state_shape))
  return RunSetup(config, workdir, mesh, model, iterator, tx, image_shape, state_shape)


def restore_or_initialize(setup: RunSetup, ckpt: Checkpointer, verbose: bool):
  """(state, meta) to start from: the newest checkpoint of the workdir (with the data iterator's position and the
  checkpoint's meta item), else a fresh state with the initial weights the config asks for (meta None)."""
  restored = ckpt.restore_latest(
    abstract_state(setup.state_shape, sharding.replicated(setup.mesh)), data_iterator=setup.iterator
  )
  if restored is not None:
    state = restored['state']
    if verbose:
      print(f'Resumed from {ckpt.directory} at step {int(state["step"])}', flush=True)
    return state, restored['meta']
  state = init_state(setup.config, setup.model, setup.tx, setup.image_shape)
  state = load_initial_weights(setup.config, state, verbose=verbose)  # train.init_checkpoint / backbone.weights
  # Placed like a restored state (replicated), so fresh and resumed runs share one compiled step.
  return sharding.put_replicated(state, setup.mesh), None


def describe_run(setup: RunSetup, state, verbose: bool) -> None:
  """Prints (process 0) the parameter count, the trainable subset, the optimizer groups and the data parallelism."""
  config, mesh = setup.config, setup.mesh
  if not verbose or jax.process_index() != 0:
    return
  print(parameter_overview.get_parameter_overview(state['params'], include_stats=False).splitlines()[-1], flush=True)
  groups = optim_lib.group_summary(partition.trainable_params(config, state['params']))
  if partition.trainable_predicate(config) is not None:
    print(partition.describe(config, state['params']), flush=True)
  print('optimizer groups: ' + ', '.join(f'{k}: {v[1]:,}' for k, v in sorted(groups.items())), flush=True)
  if mesh.size > 1:
    batch = int(config.train.batch_size)
    print(
      f'data parallel: {mesh.shape[sharding.DATA]} devices, {jax.process_count()} process(es), global batch '
      f'{batch} ({batch // mesh.shape[sharding.DATA]} per device)',
      flush=True,
    )


class NonFiniteGuard:
  """The host side of the NaN guard: tracks the current streak of skipped updates, warns for each and raises
  NonFiniteError after config.train.max_consecutive_nonfinite in a row."""

  def __init__(self, limit: int):
    self.limit = int(limit)
    self.streak = []  # (step, non-finite names) of the current run of skipped updates

  def check(self, step: int, scalars, consecutive: int, ckpt: Checkpointer) -> None:
    if not consecutive:
      self.streak = []
      return
    self.streak.append((step, nonfinite_names(scalars)))
    log.warning(
      'step %d: non-finite %s; update skipped (%d consecutive, limit train.max_consecutive_nonfinite = %d)',
      step,
      ', '.join(self.streak[-1][1]) or 'values',
      consecutive,
      self.limit,
    )
    if consecutive >= self.limit:
      ckpt.wait_until_finished()
      raise NonFiniteError(_nonfinite_message(self.streak, self.limit, ckpt))


class IntervalLog:
  """Averages the step scalars between two log lines and writes them (metrics.jsonl, TensorBoard, progress bar)."""

  def __init__(self, config, workdir, start: int, verbose: bool):
    self.log_every, self.num_steps = int(config.train.log_every), int(config.train.num_steps)
    self.writer = MetricWriter(workdir, start_step=start)
    self.bar = ProgressBar(self.num_steps, initial=start, enabled=verbose and jax.process_index() == 0)
    self.averages = MetricAverages()
    self.data_counts = DataCounts()
    self.last_log = time.time()

  def add(self, step: int, scalars, state) -> None:
    self.averages.add(scalars)
    if step % self.log_every and step != self.num_steps:
      self.bar.update(step)
      return
    values = self.averages.compute()
    values['skipped_total'] = int(state['nonfinite']['total'])
    values.update(self.data_counts.interval())
    now = time.time()
    full = step % self.log_every == 0
    values['steps_per_sec'] = self.log_every / max(now - self.last_log, 1e-9) if full else float('nan')
    self.last_log = now
    self.writer.write_scalars(step, values)
    self.bar.update(step, loss=values['loss'])
    self.averages = MetricAverages()

  def close(self) -> None:
    self.bar.close()
    self.writer.close()


def train(config, workdir, *, data_iterator=None, verbose=True):
  """Trains `config` in `workdir` until config.train.num_steps; returns the final state (host arrays).

  The steps: `prepare_run` (workdir, mesh, model, data, optimizer) -> `restore_or_initialize` -> `describe_run` ->
  the loop (`run_steps`: step, NaN guard, interval logs, evaluation, checkpoints).
  Raises TrainingInterrupted (SIGTERM / SIGINT, after saving), NonFiniteError (too many consecutive non-finite
  updates), CheckpointError (unwritable workdir, full disk), CheckpointMismatchError (a checkpoint of another
  model in WORKDIR) or ConfigError (an init checkpoint, class map or eval split that cannot work; before any step).
  """
  setup = prepare_run(config, workdir, data_iterator)
  ckpt = Checkpointer(workdir, config)
  try:  # bad input is reported before anything compiles
    if ckpt.latest_step() is None:  # a fresh run: its init checkpoint and class map
      check_initial_weights(config)
    if config.train.get('eval_every', 0):
      check_eval_split(config)
  except BaseException:
    ckpt.close()
    raise
  state, meta = restore_or_initialize(setup, ckpt, verbose)
  describe_run(setup, state, verbose)
  logs = IntervalLog(config, workdir, int(state['step']), verbose)
  try:
    periodic = PeriodicEvaluation(config, workdir, logs.writer, meta, verbose=verbose)
  except BaseException:
    logs.close()
    ckpt.close()
    raise
  step_fn = compiled_train_step(config, setup.model, setup.tx, setup.mesh)
  stop = _StopSignals().install()
  try:
    state = run_steps(setup, step_fn, state, ckpt, logs, stop, periodic)
    ckpt.wait_until_finished()
    periodic.wait_until_finished()
    if verbose:
      logs.data_counts.report()
  except BaseException:
    stop.uninstall()
    logs.close()
    try:
      periodic.close()
      ckpt.close()
    except Exception as e:  # the error in flight is the one to report
      log.warning('closing the checkpointer after an error: %s', e)
    raise
  stop.uninstall()
  logs.close()
  periodic.close()
  ckpt.close()
  return state


def run_steps(
  setup: RunSetup,
  step_fn,
  state,
  ckpt: Checkpointer,
  logs: IntervalLog,
  stop: _StopSignals,
  periodic: PeriodicEvaluation | None = None,
):
  """The training loop from state['step'] to config.train.num_steps; returns the final state.

  Per step: the signal check (save and raise TrainingInterrupted), the next batch, the jitted step, one device ->
  host transfer of its scalars, the NaN guard, the interval log, the evaluation when due (periodic_eval.py: it only
  reads the params) and the periodic checkpoint (with the best evaluation so far in its meta). The data state saved
  with a checkpoint is the state after the batches consumed so far: the next batch is fetched only after saving.
  """
  t, it = setup.config.train, setup.iterator
  guard = NonFiniteGuard(t.max_consecutive_nonfinite)
  step = int(state['step'])
  meta = periodic.checkpoint_meta if periodic is not None else dict
  while step < t.num_steps:
    if stop.signum is not None:
      ckpt.save(step, state, data=it, metrics=meta())
      ckpt.wait_until_finished()
      raise TrainingInterrupted(stop.signum, step, ckpt.directory)
    batch = next(it)
    logs.data_counts.add(batch)
    state, scalars = run_step(step_fn, setup.mesh, state, batch)
    step += 1
    # One device -> host transfer per step (the guard must see every skip; the metrics are averaged here).
    scalars, consecutive = jax.device_get((scalars, state['nonfinite']['consecutive']))
    consecutive = int(consecutive)
    guard.check(step, scalars, consecutive, ckpt)
    logs.add(step, scalars, state)
    if periodic is not None and periodic.due(step):
      periodic.run(step, state)
    # No periodic checkpoint in a streak of skipped updates: the last good checkpoint stays the newest.
    if (step % t.checkpoint_every == 0 and not consecutive) or step == t.num_steps:
      ckpt.save(step, state, data=it, metrics=meta())
  return state


def _nonfinite_message(streak, limit, ckpt) -> str:
  first, last = streak[0][0], streak[-1][0]
  lines = '\n'.join(f'  step {s}: {", ".join(names) or "(no named term)"}' for s, names in streak[-10:])
  newest = ckpt.latest_step()
  kept = f'{ckpt.directory}/{newest}' if newest is not None else 'none (no checkpoint was written)'
  return (
    f'stopped at step {last}: {len(streak)} consecutive updates had a non-finite loss or gradients (steps {first}-'
    f'{last}; train.max_consecutive_nonfinite = {limit}). Non-finite terms:\n{lines}\n'
    f'These updates were skipped; the newest checkpoint ({kept}) holds the last good parameters. Lower optim.lr or '
    'check the data of these steps, then rerun to resume from it.'
  )
