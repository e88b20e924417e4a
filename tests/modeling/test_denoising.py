"""The DN layout and self-attention mask rules (docs/architecture.md, "Denoising queries"), with static shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimaskdino_jax.modeling.denoising import dn_attention_mask, dn_layout, dn_queries, draw_dn_noise


def official_mask(pad_size, single_pad, num_queries):
  """The official mask, (pad + Q)^2, written from the reference text."""
  n = pad_size + num_queries
  mask = np.zeros((n, n), bool)
  mask[pad_size:, :pad_size] = True
  groups = pad_size // single_pad if single_pad else 0
  for g in range(groups):
    lo, hi = g * single_pad, (g + 1) * single_pad
    mask[lo:hi, hi:pad_size] = True
    mask[lo:hi, :lo] = True
  return mask


@pytest.mark.parametrize('counts, slots', [((3, 1), 10), ((2, 2), 9), ((5, 0), 20), ((1,), 4), ((0, 0), 6), ((7,), 6)])
def test_layout_and_mask(counts, slots):
  g = 8
  valid = np.zeros((len(counts), g), bool)
  for b, n in enumerate(counts):
    valid[b, :n] = True
  info, group = dn_layout(jnp.asarray(valid), slots)
  max_gt = max(counts)
  groups = slots // max_gt if 0 < max_gt <= slots else 0
  pad = groups * max_gt
  assert int(info.num_groups) == groups
  np.testing.assert_array_equal(np.asarray(info.slot_active), np.arange(slots) < pad)
  for b, n in enumerate(counts):
    for s in range(slots):
      want = s < pad and (s % max_gt) < n
      assert bool(info.positive[b, s]) == want
      if want:
        assert int(info.gt_index[b, s]) == s % max_gt
  q = 5
  mask = np.asarray(dn_attention_mask(group, q))
  ref = official_mask(pad, max_gt, q)
  total = slots + q
  idx_active = list(range(pad))
  idx_match = list(range(slots, total))
  rows = idx_active + idx_match
  # Active slots and matching queries see exactly what the official (unpadded) mask lets them see.
  sub = mask[np.ix_(rows, rows)]
  np.testing.assert_array_equal(sub, ref)
  # Inactive slots: see only themselves; nobody sees them.
  for s in range(pad, slots):
    assert not mask[s, s]
    assert mask[s, np.arange(total) != s].all()
    assert mask[np.arange(total) != s, s].all()


def test_dn_queries_noise_free_and_padding():
  valid = jnp.array([[True, True, False], [True, False, False]])
  labels = jnp.array([[1, 2, 0], [0, 0, 0]])
  boxes = jnp.array([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.4], [0, 0, 0, 0]], [[0.2, 0.8, 0.2, 0.2]] * 3])
  info, _ = dn_layout(valid, 5)  # max_gt 2 -> 2 groups, pad 4, slot 4 inactive
  table = jnp.arange(3 * 4, dtype=jnp.float32).reshape(3, 4)
  content, anchors = dn_queries(
    draw_dn_noise(jax.random.key(0), info.positive.shape, 3, 0.0), labels, boxes, info, 0.0, lambda i: table[i]
  )
  sig = jax.nn.sigmoid(anchors)
  # image 0: slots 0,2 -> GT0, 1,3 -> GT1; image 1: slots 0,2 -> GT0, slots 1,3 unused, 4 inactive
  np.testing.assert_allclose(content[0, 0], table[1])
  np.testing.assert_allclose(content[0, 3], table[2])
  np.testing.assert_allclose(sig[0, 2], boxes[0, 0], atol=1e-5)
  assert (content[1, 1] == 0).all() and (anchors[1, 1] == 0).all()
  assert (content[:, 4] == 0).all() and (anchors[:, 4] == 0).all()


def test_box_noise_bounds():
  valid = jnp.ones((1, 4), bool)
  boxes = jnp.array([[[0.5, 0.5, 0.2, 0.4]] * 4])
  info, _ = dn_layout(valid, 100)
  _, anchors = dn_queries(
    draw_dn_noise(jax.random.key(3), info.positive.shape, 5, 0.4),
    jnp.zeros((1, 4), jnp.int32),
    boxes,
    info,
    0.4,
    lambda i: i[..., None] * 1.0,
  )
  b = np.asarray(jax.nn.sigmoid(anchors))[0][np.asarray(info.positive[0])]
  # centre moves at most wh/2 * 0.4, size at most wh * 0.4
  assert np.all(np.abs(b[:, 0] - 0.5) <= 0.1 * 0.4 + 1e-5) and np.all(np.abs(b[:, 1] - 0.5) <= 0.2 * 0.4 + 1e-5)
  assert np.all(np.abs(b[:, 2] - 0.2) <= 0.2 * 0.4 + 1e-5) and np.all(np.abs(b[:, 3] - 0.4) <= 0.4 * 0.4 + 1e-5)
  assert np.std(b[:, 0]) > 0  # noise is applied
