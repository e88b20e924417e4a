"""layers.Dense / layers.dense: nn.Dense's parameters and forward, with a gradient taken as 2-D matrix products on
a CPU (dW = X^T dY, db = ones^T dY) and by autodiff elsewhere.

Against nn.Dense: the same parameter tree, the same outputs bitwise, and the same input, kernel and bias gradients
within float32 summation-order error (relative 1e-5 of the largest entry), for inputs of rank 2 to 4 and for the
bias-less form (DenseBiasApart); both backward branches are checked on this machine.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimaskdino_jax.modeling import layers


def _close(got, want):
  want = np.asarray(want)
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize('shape', [(37, 16), (2, 29, 16), (3, 2, 11, 16)])
def test_dense_matches_nn_dense(shape):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  init = dict(kernel_init=nn.initializers.normal(1.0), bias_init=nn.initializers.normal(1.0))
  ours, ref = layers.Dense(24, **init), nn.Dense(24, **init)
  variables = ref.init(jax.random.key(0), x)
  assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(variables)
  for k in ('kernel', 'bias'):  # same initializers, same creation order -> the same draws
    np.testing.assert_array_equal(ours.init(jax.random.key(0), x)['params'][k], variables['params'][k])
  np.testing.assert_array_equal(np.asarray(ours.apply(variables, x)), np.asarray(ref.apply(variables, x)))

  def grads(module):
    return jax.jit(jax.grad(lambda v, x: jnp.sum(jnp.sin(module.apply(v, x))), argnums=(0, 1)))(variables, x)

  jaxpr = str(jax.make_jaxpr(jax.grad(lambda v: jnp.sum(ours.apply(v, x))))(variables))
  assert 'branches_platforms' in jaxpr  # the backward's CPU / other-platform choice
  for g, w in zip(jax.tree.leaves(grads(ours)), jax.tree.leaves(grads(ref))):
    _close(g, w)


def test_both_backward_branches_and_the_bias_less_form():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 13, 8)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)
  dy = jnp.asarray(rng.normal(size=(2, 13, 5)), jnp.float32)
  want_dx = dy @ kernel.T
  want_dw = jnp.einsum('bnk,bnc->kc', x, dy)
  want_db = dy.sum(axis=(0, 1))
  for branch in (layers._dense_grads_by_products, layers._dense_grads_by_autodiff):
    for got, want in zip(jax.jit(branch)(x, kernel, dy), (want_dx, want_dw, want_db)):
      _close(got, want)
  # Without a bias (DenseBiasApart's value projection): no bias gradient, the same dx and dW.
  y, vjp = jax.vjp(lambda x, k: layers.dense(x, k, None), x, kernel)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x @ kernel))
  dx, dw = vjp(dy)
  _close(dx, want_dx)
  _close(dw, want_dw)
