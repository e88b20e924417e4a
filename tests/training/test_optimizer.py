"""Optimizer (docs/architecture.md, "Training settings"): parameter groups, lr schedule, clipping, weight decay,
accumulation, torch AdamW parity."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dimaskdino_jax.training.optimizer import (
  BACKBONE_DECAY,
  BACKBONE_NO_DECAY,
  DECAY,
  FROZEN,
  NO_DECAY,
  build_optimizer,
  group_summary,
  learning_rate,
  learning_rate_schedule,
  param_labels,
)


def make_config(**optim):
  c = ml_collections.ConfigDict()
  c.optim = ml_collections.ConfigDict(
    dict(
      lr=1e-3,
      weight_decay=0.05,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      backbone_multiplier=0.1,
      clip_norm=0.0,
      lr_scheduler='WarmupMultiStepLR',
      lr_end=0.0,
      lr_drop_steps=(),
      lr_drop_factor=0.1,
      warmup_steps=0,
      warmup_factor=1.0,
      grad_accum_steps=1,
    )
  )
  c.optim.update(optim)
  c.train = ml_collections.ConfigDict({'num_steps': 1000})
  return c


class ConvNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Conv(4, (1, 1), use_bias=False, name='conv')(x)


class Tiny(nn.Module):
  """Names as the real model uses them: backbone convs, LayerNorms, GroupNorm, Embed, level_embed, biases."""

  @nn.compact
  def __call__(self, x, labels):
    y = ConvNorm(name='backbone')(x)
    y = ConvNorm()(y)  # auto-named 'ConvNorm_0': its conv kernel is not a norm parameter
    y = nn.GroupNorm(num_groups=2)(nn.Conv(4, (1, 1), name='input_proj')(y))  # 'GroupNorm_0'
    level_embed = self.param('level_embed', nn.initializers.normal(), (2, 4))
    t = y.reshape(y.shape[0], -1, 4) + level_embed[0]
    t = nn.LayerNorm(name='enc_output_norm')(nn.Dense(4, name='enc_output')(t))
    t = nn.LayerNorm(name='norm1')(t)
    q = nn.Embed(5, 4, name='label_enc')(labels)
    return nn.LayerNorm(name='decoder_norm')(nn.Dense(4, name='class_embed')(t).sum(1) + q)


@functools.cache
def tiny_params():
  shapes = jax.eval_shape(Tiny().init, jax.random.key(0), jnp.ones((1, 2, 2, 3)), jnp.zeros((1,), jnp.int32))
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes['params'])


def group_params():
  """A small tree with one leaf or two of every group."""
  return {
    'backbone': {'conv': {'kernel': jnp.linspace(-1, 1, 6).reshape(2, 3)}, 'norm': {'scale': jnp.ones(3)}},
    'decoder_norm': {'scale': jnp.full((3,), 2.0), 'bias': jnp.full((3,), 0.3)},
    'head': {'kernel': jnp.linspace(0.5, 2, 6).reshape(3, 2), 'bias': jnp.array([0.2, -0.4])},
  }


def flat_labels(params):
  flat = jax.tree_util.tree_flatten_with_path(param_labels(params))[0]
  return {'/'.join(str(k.key) for k in path): lab for path, lab in flat}


def test_param_labels_by_path():
  labels = flat_labels(tiny_params())
  assert labels == {
    'backbone/conv/kernel': BACKBONE_DECAY,
    'ConvNorm_0/conv/kernel': DECAY,
    'input_proj/kernel': DECAY,
    'input_proj/bias': DECAY,  # biases decay
    'GroupNorm_0/scale': NO_DECAY,
    'GroupNorm_0/bias': NO_DECAY,
    'level_embed': DECAY,  # level_embed decays
    'enc_output/kernel': DECAY,
    'enc_output/bias': DECAY,
    'enc_output_norm/scale': NO_DECAY,
    'enc_output_norm/bias': NO_DECAY,
    'norm1/scale': NO_DECAY,
    'norm1/bias': NO_DECAY,
    'label_enc/embedding': NO_DECAY,
    'class_embed/kernel': DECAY,
    'class_embed/bias': DECAY,
    'decoder_norm/scale': NO_DECAY,
    'decoder_norm/bias': NO_DECAY,
  }
  nested = {'backbone': {'res2': {'norm': {'scale': 1.0, 'bias': 0.0}}}, 'label_enc': 1.0}
  assert flat_labels(nested) == {
    'backbone/res2/norm/scale': BACKBONE_NO_DECAY,
    'backbone/res2/norm/bias': BACKBONE_NO_DECAY,
    'label_enc': NO_DECAY,
  }
  assert group_summary(nested) == {BACKBONE_NO_DECAY: (2, 2), NO_DECAY: (1, 1)}


def test_frozen_backbone_stages_get_no_update():
  k = jnp.ones((2, 2))
  params = {
    'backbone': {
      'stem': {'conv': {'kernel': k}},
      'res2_0': {'conv1': {'conv': {'kernel': k}}},
      'res3_0': {'kernel': k},
    },
    'head': {'kernel': k},
  }
  assert flat_labels(params) == {
    'backbone/stem/conv/kernel': BACKBONE_DECAY,
    'backbone/res2_0/conv1/conv/kernel': BACKBONE_DECAY,
    'backbone/res3_0/kernel': BACKBONE_DECAY,
    'head/kernel': DECAY,
  }
  config = make_config(weight_decay=0.05)
  config.model = ml_collections.ConfigDict({'backbone': {'freeze_at': 2}})  # detectron2 FREEZE_AT 2: stem + res2
  labels = {
    '/'.join(str(x.key) for x in p): v for p, v in jax.tree_util.tree_flatten_with_path(param_labels(params, 2))[0]
  }
  assert {name for name, lab in labels.items() if lab == FROZEN} == {
    'backbone/stem/conv/kernel',
    'backbone/res2_0/conv1/conv/kernel',
  }
  tx = build_optimizer(config, params)
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), jax.jit(tx.init)(params), params)
  assert float(jnp.abs(updates['backbone']['stem']['conv']['kernel']).max()) == 0.0
  assert float(jnp.abs(updates['backbone']['res2_0']['conv1']['conv']['kernel']).max()) == 0.0
  assert float(jnp.abs(updates['backbone']['res3_0']['kernel']).min()) > 0.0


def test_lr_schedule_warmup_and_drops():
  c = make_config(lr=2e-4, warmup_steps=50, warmup_factor=0.1, lr_drop_steps=(200, 100), lr_drop_factor=0.1)
  s = learning_rate_schedule(c)
  expected = {0: 0.1, 25: 0.55, 40: 0.1 * 0.2 + 0.8, 50: 1.0, 99: 1.0, 100: 0.1, 199: 0.1, 200: 0.01, 10**6: 0.01}
  for step, factor in expected.items():
    assert float(s(step)) == pytest.approx(2e-4 * factor, rel=1e-6), step
  # The reference config (WARMUP_FACTOR 1.0 over 10 iterations): constant until the drop at 81125.
  c = make_config(lr=1e-4, warmup_steps=10, warmup_factor=1.0, lr_drop_steps=(81125,))
  s = jax.jit(learning_rate_schedule(c))
  np.testing.assert_allclose([s(t) for t in (0, 5, 10, 81124, 81125)], [1e-4] * 4 + [1e-5], rtol=1e-6)


def test_lr_schedule_cosine_follows_torch_cosine_annealing():
  # Without warmup, d2's WarmupCosineLR is torch's CosineAnnealingLR(T_max = updates, eta_min = lr_end).
  import torch

  c = make_config(lr=2e-3, lr_scheduler='WarmupCosineLR', lr_end=1e-4, grad_accum_steps=2)
  c.train.num_steps = 400  # 200 optimizer updates
  s = jax.jit(learning_rate_schedule(c))
  opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2e-3)
  sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=200, eta_min=1e-4)
  expected = []
  for _ in range(201):
    expected.append(opt.param_groups[0]['lr'])
    opt.step()
    sched.step()
  np.testing.assert_allclose([float(s(t)) for t in range(201)], expected, rtol=1e-5, atol=1e-9)
  assert float(s(10**6)) == pytest.approx(1e-4, rel=1e-6)  # held at the end value after the last update
  # d2's linear warmup (fixed interval): from warmup_factor * f(0) to f(warmup), then the cosine of step / T.
  c = make_config(lr=1.0, lr_scheduler='WarmupCosineLR', warmup_steps=50, warmup_factor=0.1)
  c.train.num_steps = 1000
  s = learning_rate_schedule(c)
  f = lambda t: 0.5 * (1 + np.cos(np.pi * t / 1000))  # noqa: E731
  for t in (0, 20, 49):
    a = t / 50
    assert float(s(t)) == pytest.approx(0.1 * (1 - a) + f(50) * a, rel=1e-5), t
  for t in (50, 500, 999, 1000):
    assert float(s(t)) == pytest.approx(f(t), rel=1e-5, abs=1e-7), t


def _update(tx, grads, params, state=None):
  state = tx.init(params) if state is None else state
  updates, state = tx.update(grads, state, params)
  return updates, state


def test_clipping_at_global_norm():
  # b1 = b2 = 0 and eps = 1: the first Adam step is g / (|g| + 1), which shows the magnitude of the clipped gradient.
  params = {'a': jnp.zeros((2,)), 'b': jnp.zeros((1,))}
  grads = {'a': jnp.array([3.0, 0.0]), 'b': jnp.array([4.0])}  # global norm 5
  for clip, factor in ((0.01, 0.01 / 5), (10.0, 1.0), (0.0, 1.0)):
    tx = build_optimizer(make_config(lr=1.0, b1=0.0, b2=0.0, eps=1.0, weight_decay=0.0, clip_norm=clip), params)
    updates, _ = _update(tx, grads, params)
    for k in grads:
      g = np.asarray(grads[k]) * factor
      np.testing.assert_allclose(updates[k], -g / (np.abs(g) + 1.0), rtol=1e-5, err_msg=f'clip {clip}')


def test_weight_decay_per_group_with_zero_gradients():
  params = tiny_params()
  tx = build_optimizer(make_config(lr=1e-2, weight_decay=0.05, backbone_multiplier=0.1, clip_norm=0.01), params)
  updates, state = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), jax.jit(tx.init)(params), params)
  expected_factor = {DECAY: 1e-2 * 0.05, BACKBONE_DECAY: 1e-3 * 0.05, NO_DECAY: 0.0, BACKBONE_NO_DECAY: 0.0}
  jax.tree.map(
    lambda u, p, lab: np.testing.assert_allclose(u, -expected_factor[lab] * p, rtol=1e-6, atol=1e-12),
    updates,
    params,
    param_labels(params),
  )
  assert float(learning_rate(state)) == pytest.approx(1e-2)


def test_multisteps_equals_one_step_on_mean_gradient():
  params = group_params()
  rng = np.random.default_rng(0)
  micro = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params) for _ in range(8)]
  kw = dict(lr=1e-2, clip_norm=0.5, warmup_steps=2, warmup_factor=0.5, lr_drop_steps=(1,))
  accum = build_optimizer(make_config(grad_accum_steps=4, **kw), params)
  plain = build_optimizer(make_config(**kw), params)

  p_acc, s_acc = params, jax.jit(accum.init)(params)
  accum_update = jax.jit(accum.update)
  for i, g in enumerate(micro):
    u, s_acc = accum_update(g, s_acc, p_acc)
    if i % 4 != 3:
      assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(u))  # nothing until the 4th micro-step
    p_acc = jax.tree.map(jnp.add, p_acc, u)

  p_ref, s_ref = params, jax.jit(plain.init)(params)
  plain_update = jax.jit(plain.update)
  for j in range(2):
    mean = jax.tree.map(lambda *gs: sum(gs) / 4, *micro[4 * j : 4 * j + 4])
    u, s_ref = plain_update(mean, s_ref, p_ref)
    p_ref = jax.tree.map(jnp.add, p_ref, u)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p_acc, p_ref)
  assert float(learning_rate(s_acc)) == pytest.approx(float(learning_rate(s_ref)))


def torch_adamw_reference(params, grads_seq, labels, *, lr_fn, wd, b1, b2, eps, mult, clip):
  """float64 numpy transcription of torch AdamW + clip_grad_norm_ with d2's parameter groups."""
  p = {k: np.asarray(v, np.float64).copy() for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t, grads in enumerate(grads_seq, start=1):
    g = {k: np.asarray(x, np.float64) for k, x in grads.items()}
    norm = np.sqrt(sum((x**2).sum() for x in g.values()))
    coef = min(clip / (norm + 1e-6), 1.0)
    g = {k: x * coef for k, x in g.items()}
    for k in p:
      lr = lr_fn(t - 1) * (mult if labels[k].startswith('backbone') else 1.0)
      w = wd if labels[k] in (DECAY, BACKBONE_DECAY) else 0.0
      p[k] *= 1 - lr * w
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
      denom = np.sqrt(v[k]) / np.sqrt(1 - b2**t) + eps
      p[k] -= lr / (1 - b1**t) * m[k] / denom
  return p


def test_matches_torch_adamw_with_groups():
  params = group_params()
  kw = dict(lr=1e-2, weight_decay=0.05, backbone_multiplier=0.1, clip_norm=0.01, warmup_steps=2, warmup_factor=0.1)
  config = make_config(lr_drop_steps=(3,), **kw)
  tx = jax.jit(build_optimizer(config, params).update)
  rng = np.random.default_rng(1)
  grads_seq = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params) for _ in range(5)]

  state, p = build_optimizer(config, params).init(params), params
  for g in grads_seq:
    u, state = tx(g, state, p)
    p = jax.tree.map(jnp.add, p, u)

  flat = lambda tree: {
    '/'.join(str(k.key) for k in path): x for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
  }
  schedule = learning_rate_schedule(config)
  ref = torch_adamw_reference(
    flat(params),
    [flat(g) for g in grads_seq],
    flat(param_labels(params)),
    lr_fn=lambda s: float(schedule(s)),
    wd=0.05,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    mult=0.1,
    clip=0.01,
  )
  for k, x in flat(p).items():
    np.testing.assert_allclose(x, ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert float(learning_rate(state)) == pytest.approx(1e-3)  # step 4 (the 5th update): after the drop at 3
