"""Sine position embeddings (docs/architecture.md, "Pixel decoder" and "Decoder").

* `sine_embedding_2d`: PositionEmbeddingSine(normalize=True, scale=2*pi) of an (H, W) map: y = (i + 1) / (H + 1e-6)
  * 2*pi (not centred), channels concat(pos_y, pos_x), each interleaving sin/cos.
* `box_sine_embedding`: gen_sineembed_for_position of (x, y[, w, h]) in [0, 1]: each value * 2*pi over
  `num_feats` frequencies, interleaved sin/cos, concatenated in the order (y, x, w, h).
"""

import math

import jax.numpy as jnp


def _dim_t(num_feats, temperature=10000.0):
  i = jnp.arange(num_feats, dtype=jnp.float32)
  return temperature ** (2.0 * jnp.floor(i / 2.0) / num_feats)  # (F,)


def _interleave(values, dim_t):
  """values (...,) -> (..., F): channel 2j = sin(values / dim_t[2j]), 2j+1 = cos(values / dim_t[2j+1])."""
  phases = values[..., None] / dim_t
  return jnp.stack([jnp.sin(phases[..., 0::2]), jnp.cos(phases[..., 1::2])], axis=-1).reshape(*phases.shape)


def sine_embedding_2d(height, width, num_feats, temperature=10000.0):
  """(H, W, 2 * num_feats) embedding of a fully valid map."""
  scale = 2 * math.pi
  eps = 1e-6
  y = jnp.arange(1, height + 1, dtype=jnp.float32) / (height + eps) * scale  # (H,)
  x = jnp.arange(1, width + 1, dtype=jnp.float32) / (width + eps) * scale  # (W,)
  dim_t = _dim_t(num_feats, temperature)
  pos_y = _interleave(y, dim_t)  # (H, F)
  pos_x = _interleave(x, dim_t)  # (W, F)
  pos_y = jnp.broadcast_to(pos_y[:, None, :], (height, width, num_feats))
  pos_x = jnp.broadcast_to(pos_x[None, :, :], (height, width, num_feats))
  return jnp.concatenate([pos_y, pos_x], axis=-1)


def box_sine_embedding(pos, num_feats, temperature=10000.0):
  """pos (..., 2 or 4) as (x, y[, w, h]) -> (..., num_feats * D) in the order (y, x[, w, h])."""
  scale = 2 * math.pi
  dim_t = _dim_t(num_feats, temperature)
  parts = [_interleave(pos[..., c] * scale, dim_t) for c in range(pos.shape[-1])]
  order = [1, 0] + list(range(2, pos.shape[-1]))
  return jnp.concatenate([parts[c] for c in order], axis=-1)
