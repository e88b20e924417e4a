"""layers.max_pool: nn.max_pool's forward, and a tap-by-tap gradient that routes each window's gradient where
autodiff of nn.max_pool routes it (the first maximum in row-major tap order, torch's max_pool2d choice on ties)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimaskdino_jax.modeling import layers


def _numpy_max_pool_grad(x, g, window, strides, padding):
  """The reference routing in plain loops: each output pixel's g to the first (row-major) input of its window that
  equals the window's maximum; padding never wins (-inf)."""
  b, h, w, c = x.shape
  (pt, pb), (pl, pr) = padding
  xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=-np.inf)
  dxp = np.zeros_like(xp, dtype=np.float64)
  for n in range(b):
    for yo in range(g.shape[1]):
      for xo in range(g.shape[2]):
        win = xp[n, yo * strides[0] : yo * strides[0] + window[0], xo * strides[1] : xo * strides[1] + window[1]]
        flat = win.reshape(-1, c)  # (kh * kw, C), row-major taps
        first = np.argmax(flat == flat.max(axis=0), axis=0)  # (C,) the first tap at the max
        dy, dx = np.divmod(first, window[1])
        dxp[n, yo * strides[0] + dy, xo * strides[1] + dx, np.arange(c)] += g[n, yo, xo]
  return dxp[:, pt : pt + h, pl : pl + w]


@pytest.mark.parametrize(
  'shape, window, strides, padding',
  [
    ((2, 12, 10, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),  # the ResNet stem's pool, even sizes
    ((1, 9, 7, 2), (3, 3), (2, 2), ((1, 1), (1, 1))),  # odd sizes
    ((1, 8, 8, 2), (2, 2), (2, 2), ((0, 0), (0, 0))),  # no overlap, no padding
    ((1, 7, 9, 2), (3, 2), (1, 2), ((1, 0), (0, 1))),  # asymmetric window, stride and padding
  ],
)
def test_max_pool_forward_and_gradient_route_like_autodiff(shape, window, strides, padding):
  rng = np.random.default_rng(0)
  x = np.maximum(rng.standard_normal(shape), 0).astype(np.float32)  # ReLU'd: many all-zero windows (ties)
  x[0, 1:4, 1:4, 0] = 0.5  # a plateau: ties at a positive max
  g = rng.standard_normal(np.asarray(nn.max_pool(jnp.asarray(x), window, strides=strides, padding=padding)).shape)
  g = g.astype(np.float32)

  def ref(x_):
    return nn.max_pool(x_, window, strides=strides, padding=padding)

  def ours(x_):
    return layers.max_pool(x_, window, strides, padding)

  y_ref, vjp_ref = jax.vjp(ref, jnp.asarray(x))
  y, vjp = jax.jit(lambda x_: jax.vjp(ours, x_))(jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
  (dx_ref,) = vjp_ref(jnp.asarray(g))
  (dx,) = vjp(jnp.asarray(g))
  want = _numpy_max_pool_grad(x, g, window, strides, padding)
  np.testing.assert_allclose(np.asarray(dx_ref), want, rtol=0, atol=1e-6)  # the loops describe autodiff's routing
  np.testing.assert_allclose(np.asarray(dx), want, rtol=0, atol=1e-6)  # overlapping windows add in another order
  np.testing.assert_array_equal(np.asarray(dx) != 0, want != 0)
