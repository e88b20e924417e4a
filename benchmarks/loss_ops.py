r"""The training step's hot spots of sessions 16, 18 and 19, each against the formulation it replaced, at the R50 step's
sizes.

  python benchmarks/loss_ops.py [--repeats 7] [--json OUT]

One jitted call each, median of --repeats after a warm-up, one after the other in one process (compare within a
run: the machine's speed drifts by the hour):

* candidates: PointRend's uncertainty -|logit| at 37,632 points of 200 maps of 128 x 128, `point_sample` (stacked
  taps) vs `point_sample_no_grad` (four gathers);
* gt labels: 200 uint8 GT maps at 12,544 points, the same two samplers;
* uniforms: the loss loop's (200, 40,768, 2) draw, `jax.random.uniform` (threefry) vs `hashed_uniform`;
* ffn: the encoder FFN at batch 2 and 512 x 512 (2 x 5,440 x 256 -> 2,048 -> 256), forward + backward, flax's
  nn.Dense vs `layers.Dense`;
* mask costs: the matcher's pairwise BCE + dice of 10 sets x 2 images x 300 queries x 12,544 points against 5 GT,
  the official two-product BCE vs `matcher.mask_costs`;
* conv 1x1 ...: forward + backward of a 1 x 1 convolution at batch 2 (the backbone's and pixel decoder's sizes), the
  convolution with its weight gradient as products (`layers._conv_matmul_wgrad`, the path before session 18) vs one
  matrix product (`layers._conv_1x1`);
* point loss loop: the loss loop's shape (7 rematerialized `lax.scan` steps, each 200 masks of 128 x 128 from a
  product of embeddings and maps, BCE + dice at 12,544 points per mask against uint8 GT), the gradient of the
  embeddings, the predicted masks sampled by `point_sample` (autodiff, before session 19) vs `point_sample_rows`;
* max pool: the R50 stem's 3 x 3 / 2 pool at batch 2 (256 x 256 x 64 after a ReLU), forward + backward of
  sum(pool(x) * dY), flax's nn.max_pool (autodiff) vs `layers.max_pool`.
Each line also gives the largest difference of the two results relative to the largest entry (per output).
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dimaskdino_jax import runtime  # noqa: E402

runtime.configure(restart=__name__ == '__main__')  # XLA_FLAGS; malloc tunables (a restart) as a script

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dimaskdino_jax.losses import criterion, matcher, point_sampling  # noqa: E402
from dimaskdino_jax.modeling import layers  # noqa: E402


def timed(fn, args, repeats):
  """(result, median ms) of a jitted fn."""
  fn = jax.jit(fn)
  out = jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return out, 1e3 * float(np.median(times))


def two_product_mask_costs(point_logits, point_labels):
  """The official form of the pairwise mask costs: pos @ t^T + neg @ (1 - t)^T (the replaced formulation)."""
  x, t = point_logits.astype(jnp.float32), point_labels.astype(jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  pos, neg = jax.nn.softplus(-x), jax.nn.softplus(x)
  bce = (jnp.einsum('qp,gp->qg', pos, t, precision=hi) + jnp.einsum('qp,gp->qg', neg, 1 - t, precision=hi)) / x.shape[
    -1
  ]
  s = jax.nn.sigmoid(x)
  numerator = 2 * jnp.einsum('qp,gp->qg', s, t, precision=hi)
  denominator = jnp.sum(s, -1)[:, None] + jnp.sum(t, -1)[None, :]
  return bce, 1 - (numerator + 1) / (denominator + 1)


def ffn_grad(dense_cls):
  """Gradient w.r.t. params and input of sum(sin(FFN(x))) with two dense layers of `dense_cls`."""
  init = dict(kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.zeros)

  class FFN(nn.Module):
    @nn.compact
    def __call__(self, x):
      return dense_cls(256, **init)(nn.relu(dense_cls(2048, **init)(x)))

  model = FFN()
  return model, jax.grad(lambda v, x: jnp.sum(jnp.sin(model.apply(v, x))), argnums=(0, 1))


def conv_grad(conv):
  """Gradient w.r.t. input and kernel of sum(sin(conv(x, w)))."""
  return jax.grad(lambda x, w: jnp.sum(jnp.sin(conv(x, w))), argnums=(0, 1))


def point_loss_loop(sampler):
  """Gradient w.r.t. the embeddings (L, N, d) of the summed point losses of L rematerialized scan steps, the masks
  (N, H, W) = embeddings . maps (H, W, d) sampled by `sampler` at points (L, N, P, 2), GT (L, N, H, W) uint8."""

  def total(embeds, maps, gt, points):
    def body(carry, xs):
      e, g, p = xs
      logits = sampler(jnp.einsum('nd,hwd->nhw', e, maps), p)  # (N, P)
      labels = point_sampling.point_sample_no_grad(g, p)  # (N, P)
      return carry + jnp.sum(criterion.sigmoid_ce_loss(logits, labels) + criterion.dice_loss(logits, labels)), None

    return jax.lax.scan(jax.checkpoint(body, prevent_cse=False), 0.0, (embeds, gt, points))[0]

  return jax.grad(total)


def max_diff(a, b):
  """The largest |a - b| of each leaf relative to the largest |a| of that leaf, over the leaves."""
  return max(
    float(jnp.max(jnp.abs(x - y)) / jnp.maximum(jnp.max(jnp.abs(x)), 1e-30))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument('--json', default='')
  opts = parser.parse_args(argv)
  rng = np.random.default_rng(0)
  results = {}

  def compare(name, before, after, args):
    ref, ms_before = timed(before, args, opts.repeats)
    out, ms_after = timed(after, args, opts.repeats)
    results[name] = {'before_ms': ms_before, 'after_ms': ms_after, 'max_rel_diff': max_diff(ref, out)}
    print(
      f'{name:26s} before {ms_before:8.1f} ms  after {ms_after:8.1f} ms  '
      f'max |diff| / max |before| {results[name]["max_rel_diff"]:.1e}'
    )

  maps = jnp.asarray(rng.standard_normal((200, 128, 128), np.float32))
  candidates = jnp.asarray(rng.random((200, 37632, 2), np.float32))
  compare(
    'candidates',
    lambda m, p: -jnp.abs(point_sampling.point_sample(m, p)),
    lambda m, p: -jnp.abs(point_sampling.point_sample_no_grad(m, p)),
    (maps, candidates),
  )
  gt = jnp.asarray((rng.random((200, 128, 128)) > 0.5).astype(np.uint8))
  points = jnp.asarray(rng.random((200, 12544, 2), np.float32))
  compare('gt labels', point_sampling.point_sample, point_sampling.point_sample_no_grad, (gt, points))

  shape = (200, point_sampling.num_uniform_draws(12544, 3.0, 0.75), 2)
  key = jax.random.key(0)
  _, ms_before = timed(lambda k: jax.random.uniform(k, shape, jnp.float32), (key,), opts.repeats)
  _, ms_after = timed(lambda k: point_sampling.hashed_uniform(k, shape), (key,), opts.repeats)
  results['uniforms'] = {'before_ms': ms_before, 'after_ms': ms_after}  # different generators: no difference
  print(f'{"uniforms":26s} before {ms_before:8.1f} ms  after {ms_after:8.1f} ms  (different streams)')

  x = jnp.asarray(rng.standard_normal((2, 5440, 256), np.float32))
  model, grad_before = ffn_grad(nn.Dense)
  _, grad_after = ffn_grad(layers.Dense)
  variables = model.init(jax.random.key(0), x)
  compare('ffn', grad_before, grad_after, (variables, x))

  logits = jnp.asarray(rng.standard_normal((10, 2, 300, 12544), np.float32) * 4)
  labels = jnp.asarray((rng.random((10, 2, 5, 12544)) > 0.5).astype(np.float32))
  compare(
    'mask costs',
    jax.vmap(jax.vmap(two_product_mask_costs)),
    jax.vmap(jax.vmap(matcher.mask_costs)),
    (logits, labels),
  )
  for h, ci, co in ((128, 64, 256), (128, 256, 64), (128, 256, 256), (64, 128, 512), (64, 512, 256)):
    x = jnp.asarray(rng.standard_normal((2, h, h, ci), np.float32))
    w = jnp.asarray(rng.standard_normal((1, 1, ci, co), np.float32) / np.sqrt(ci))
    compare(
      f'conv 1x1 {h}x{h} {ci}->{co}',
      conv_grad(lambda x_, w_: layers._conv_matmul_wgrad(x_, w_, (1, 1), ((0, 0), (0, 0)), None)),
      conv_grad(layers._conv_1x1),
      (x, w),
    )
  embeds = jnp.asarray(rng.standard_normal((7, 200, 256), np.float32) * 0.05)
  maps = jnp.asarray(rng.standard_normal((128, 128, 256), np.float32))
  gt = jnp.asarray((rng.random((7, 200, 128, 128)) > 0.5).astype(np.uint8))
  points = jnp.asarray(rng.random((7, 200, 12544, 2), np.float32))
  compare(
    'point loss loop',
    point_loss_loop(point_sampling.point_sample),
    point_loss_loop(point_sampling.point_sample_rows),
    (embeds, maps, gt, points),
  )
  x = jnp.asarray(np.maximum(rng.standard_normal((2, 256, 256, 64), np.float32), 0))
  dy = jnp.asarray(rng.standard_normal((2, 128, 128, 64), np.float32))  # the gradient from above, a buffer as in a step
  pool = ((3, 3), (2, 2), ((1, 1), (1, 1)))
  compare(
    'max pool',
    jax.grad(lambda x_, g: jnp.sum(nn.max_pool(x_, pool[0], strides=pool[1], padding=pool[2]) * g)),
    jax.grad(lambda x_, g: jnp.sum(layers.max_pool(x_, *pool) * g)),
    (x, dy),
  )
  if opts.json:
    with open(opts.json, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
