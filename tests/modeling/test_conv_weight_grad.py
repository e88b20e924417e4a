"""layers.Conv: nn.Conv whose weight gradient on a CPU is a sum of matrix products (layers.conv_general_dilated),
and whose large 1 x 1 convolutions without stride or padding are matrix products outright (forward and both
gradients; from layers.PRODUCT_1X1_MIN_MACS multiply-adds).

Against nn.Conv (lax's convolution and its gradient): the same outputs bitwise, and the same input and weight
gradients within float32 summation-order error (relative 1e-5 of the largest entry), for the convolutions that take
the products (1 x 1 from 64 channels, strided or not, 'SAME' or explicit padding; 3 x 3 at 256 channels on a map of
32,768 output pixels, with padding and stride) and for ones that keep lax's gradient; the 1 x 1 ones that are a
product throughout have no convolution left in their jaxpr (small, strided or padded ones keep lax's forward).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimaskdino_jax.modeling import layers

CASES = [
  # (input shape NHWC, kernel, out channels, stride, padding, takes the products for the gradient)
  ((2, 20, 24, 64), 1, 48, 1, 'SAME', True),
  ((2, 21, 17, 96), 1, 32, 2, ((0, 0), (0, 0)), True),
  ((2, 128, 128, 256), 3, 16, 1, ((1, 1), (1, 1)), True),
  ((2, 130, 130, 256), 3, 8, 1, ((0, 0), (0, 0)), True),
  ((1, 16, 16, 256), 3, 8, 2, ((1, 1), (1, 1)), False),  # small map: lax's gradient
  ((2, 12, 12, 3), 7, 8, 2, ((3, 3), (3, 3)), False),  # the ResNet stem: lax's
  ((2, 12, 12, 32), 1, 8, 1, 'SAME', False),  # few channels: lax's
  ((2, 64, 64, 128), 1, 128, 1, 'VALID', True),  # 2^27 multiply-adds: a product throughout
  ((2, 12, 12, 64), 1, 8, 1, ((1, 1), (1, 1)), True),  # a padded 1 x 1: lax's forward, products for dW
]


@pytest.mark.parametrize('shape,k,co,stride,padding,products', CASES)
def test_conv_weight_gradient_by_products_equals_lax(shape, k, co, stride, padding, products):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  kwargs = dict(features=co, kernel_size=(k, k), strides=(stride, stride), padding=padding)
  ours, ref = layers.Conv(**kwargs), nn.Conv(**kwargs)
  variables = ref.init(jax.random.key(0), x)
  assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(variables)

  def loss(module):
    return lambda v, x: jnp.sum(jnp.sin(module.apply(v, x)))

  jaxpr = str(jax.make_jaxpr(jax.grad(loss(ours), argnums=(0, 1)))(variables, x))
  assert ('branches_platforms' in jaxpr) == products  # the backward's CPU / other-platform choice
  macs = int(np.prod(shape)) * co
  plain_1x1 = k == 1 and stride == 1 and padding in ('SAME', 'VALID', ((0, 0), (0, 0)))
  as_product = plain_1x1 and macs >= layers.PRODUCT_1X1_MIN_MACS
  assert ('conv_general_dilated' not in jaxpr) == as_product  # those are matrix products throughout
  np.testing.assert_array_equal(np.asarray(ours.apply(variables, x)), np.asarray(ref.apply(variables, x)))
  got = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(variables, x)
  want = jax.jit(jax.grad(loss(ref), argnums=(0, 1)))(variables, x)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    w = np.asarray(w)
    np.testing.assert_allclose(np.asarray(g), w, rtol=0, atol=1e-5 * np.abs(w).max())
