"""Golden values for the small pieces, computed in NumPy float64 from the reference definitions."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from dimaskdino_jax.box_ops import inverse_sigmoid
from dimaskdino_jax.modeling import selection
from dimaskdino_jax.modeling.position import box_sine_embedding, sine_embedding_2d


def np_dim_t(f):
  return 10000.0 ** (2 * (np.arange(f) // 2) / f)


def test_sine_embedding_2d_matches_definition():
  h, w, f = 3, 5, 8
  got = np.asarray(sine_embedding_2d(h, w, f))
  assert got.shape == (h, w, 2 * f)
  dt = np_dim_t(f)
  for i in range(h):
    for j in range(w):
      ey = (i + 1) / (h + 1e-6) * 2 * math.pi
      ex = (j + 1) / (w + 1e-6) * 2 * math.pi
      for c in range(f):
        fy = math.sin(ey / dt[c]) if c % 2 == 0 else math.cos(ey / dt[c])
        fx = math.sin(ex / dt[c]) if c % 2 == 0 else math.cos(ex / dt[c])
        assert got[i, j, c] == pytest.approx(fy, abs=1e-5)
        assert got[i, j, f + c] == pytest.approx(fx, abs=1e-5)
  # The last row/column reaches 2*pi (not centred at 0.5): sin(2*pi / 1) ~ 0, cos ~ 1.
  assert got[-1, 0, 0] == pytest.approx(math.sin(2 * math.pi * h / (h + 1e-6)), abs=1e-5)


def test_box_sine_embedding_order_is_y_x_w_h():
  f = 4
  box = np.array([0.1, 0.7, 0.3, 0.9])  # x, y, w, h
  got = np.asarray(box_sine_embedding(jnp.asarray(box[None], jnp.float32), f))[0]
  dt = np_dim_t(f)

  def emb(v):
    e = v * 2 * math.pi
    return [math.sin(e / dt[c]) if c % 2 == 0 else math.cos(e / dt[c]) for c in range(f)]

  want = emb(box[1]) + emb(box[0]) + emb(box[2]) + emb(box[3])
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_inverse_sigmoid_clamps():
  x = jnp.array([-1.0, 0.0, 0.5, 1.0, 2.0, 0.25])
  got = np.asarray(inverse_sigmoid(x))
  want = [math.log(1e-5 / 1.0), math.log(1e-5 / 1.0), 0.0, math.log(1.0 / 1e-5), math.log(1.0 / 1e-5), math.log(1 / 3)]
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_proposals_reversed_level_sizes_and_validity():
  # Decoder order: coarsest first. Level l gets w = h = 0.05 * 2**l.
  shapes = ((2, 2), (4, 4), (8, 8), (128, 128))
  props, valid = selection.encoder_proposals(shapes)
  props, valid = np.asarray(props), np.asarray(valid)
  sig = 1 / (1 + np.exp(-props.astype(np.float64)))
  starts = np.cumsum([0] + [h * w for h, w in shapes])
  for lvl, (h, w) in enumerate(shapes):
    block = slice(starts[lvl], starts[lvl + 1])
    v = valid[block]
    wh = sig[block][v][:, 2:]
    np.testing.assert_allclose(wh, 0.05 * 2**lvl, rtol=1e-5)
    # centres ((j + .5) / W, (i + .5) / H), row-major
    grid = sig[block][:, :2].reshape(h, w, 2)
    if v.all():
      np.testing.assert_allclose(grid[0, 1], [1.5 / w, 0.5 / h], rtol=1e-5)
  # 128 x 128 level: the outermost ring is invalid (0.5/128 < 0.01), everything else valid.
  v = valid[starts[3] :].reshape(128, 128)
  assert not v[0].any() and not v[-1].any() and not v[:, 0].any() and not v[:, -1].any()
  assert v[1:-1, 1:-1].all()
  assert valid[: starts[3]].all()
  assert (props[~valid] == selection.INVALID_PROPOSAL).all()


def test_topk_and_gather():
  logits = jnp.array([[[0.1, 0.9], [0.5, 0.2], [-1.0, 2.0], [0.3, 0.3]]])  # (1, 4, 2); max = .9, .5, 2, .3
  idx = selection.topk_indices(logits, 2)
  np.testing.assert_array_equal(np.asarray(idx), [[2, 0]])
  x = jnp.arange(8.0).reshape(1, 4, 2)
  np.testing.assert_array_equal(np.asarray(selection.gather_tokens(x, idx)), [[[4, 5], [0, 1]]])


def test_mask2box_empty_one_pixel_and_rectangle():
  m = np.zeros((3, 8, 10), bool)
  m[1, 2, 3] = True  # one pixel at (y=2, x=3)
  m[2, 1:4, 2:7] = True  # rows 1..3, cols 2..6
  boxes = np.asarray(selection.masks_to_boxes(jnp.asarray(m)))
  # empty: (1e8 + 0) / 2 etc., no +1
  np.testing.assert_allclose(boxes[0], [0.5e8 / 10, 0.5e8 / 8, -1e8 / 10, -1e8 / 8], rtol=1e-6)
  np.testing.assert_allclose(boxes[1], [3 / 10, 2 / 8, 0, 0], atol=1e-7)
  np.testing.assert_allclose(boxes[2], [4 / 10, 2 / 8, 4 / 10, 2 / 8], atol=1e-7)
  anchors = np.asarray(selection.mask2box_anchors(jnp.where(jnp.asarray(m), 1.0, -1.0)))
  # empty mask -> inverse_sigmoid of clamped values: (+11.51, +11.51, -11.51, -11.51)
  np.testing.assert_allclose(anchors[0], [math.log(1e5)] * 2 + [-math.log(1e5)] * 2, rtol=1e-5)
  bit = np.asarray(selection.masks_to_boxes(jnp.asarray(m), plus_one=True))
  np.testing.assert_allclose(bit[1], [3.5 / 10, 2.5 / 8, 1 / 10, 1 / 8], atol=1e-7)


def test_deformable_attention_gathers_the_value_projection_without_its_bias_add():
  # The value projection's bias is handed to the op (kernels/ms_deform_attn/xla.py): on XLA:CPU a `dot + bias` value
  # gets the add fused into the gather's operand and that loop runs 6-8x slower (an R50 encoder layer's attention:
  # 1.5 s instead of 0.25 s; BENCHMARKS.md). The parameters keep nn.Dense's names and the gathers of the compiled
  # module read a buffer (a fusion parameter, possibly bitcast), never an add.
  import re

  import jax

  from dimaskdino_jax.modeling.deformable import MSDeformAttn

  shapes = ((6, 8), (3, 4))
  s = sum(h * w for h, w in shapes)
  rng = np.random.default_rng(0)
  query = jnp.asarray(rng.normal(size=(1, s, 32)), jnp.float32)
  ref = jnp.asarray(rng.uniform(size=(1, s, 2, 2)), jnp.float32)
  attn = MSDeformAttn(dim=32, num_levels=2, num_heads=4, num_points=2, impl='xla')
  params = attn.init(jax.random.PRNGKey(0), query, ref, query, shapes)
  assert set(params['params']['value_proj']) == {'kernel', 'bias'}
  params['params']['value_proj']['bias'] = jnp.full((32,), 0.5)  # a bias the compiler cannot fold away
  hlo = jax.jit(lambda p, x: attn.apply(p, x, ref, x, shapes)).lower(params, query).compile().as_text()
  # instruction -> (opcode, first operand); parameters have no operand
  defs = {
    name: (opcode, first)
    for name, opcode, first in re.findall(r'(?m)^\s*(?:ROOT )?(%[\w.\-]+) = \S+ ([\w\-]+)\((%[\w.\-]+)?', hlo)
  }
  gathers = re.findall(r'= [^\n]*? gather\((%[\w.\-]+),', hlo)
  assert gathers, 'no gather in the compiled module'
  for operand in gathers:
    while defs[operand][0] == 'bitcast':
      operand = defs[operand][1]
    assert defs[operand][0] == 'parameter', (operand, defs[operand])
