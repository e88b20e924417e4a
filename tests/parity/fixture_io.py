"""The reduced parity configuration and the compact fixture encoding, shared by make_fixtures.py and the tests.

The official code needs hidden size 256, so even a reduced model has about 6 M parameters (24 MB in float32). To keep
the committed state_dict small, every weight tensor with >= QUANTIZE_MIN elements holds values on a 4-level grid,
(code - 1.5) * scale with code in {0, 1, 2, 3}: random, non-zero, different per element (layout errors cannot hide),
and stored exactly in 2 bits. Smaller tensors (norms, biases, FrozenBN statistics, level embeddings) are random
float32 stored as they are. The PyTorch model ran with exactly these values, so the decoded state_dict is the one
that produced the golden outputs. Duplicate names of shared modules (identical arrays) are stored once, as references.
"""

import numpy as np

QUANTIZE_MIN = 4096

# The reduced configuration (hidden 256, as the official code requires). Keys name both sides' settings.
PARITY = dict(
  num_classes=5,
  hidden_dim=256,
  stem_width=8,  # RESNETS.STEM_OUT_CHANNELS
  width=8,  # RESNETS.WIDTH_PER_GROUP (res2 bottleneck); res2..res5 out = 32, 64, 128, 256
  res2_out_channels=32,
  enc_layers=2,
  enc_ffn=32,
  dec_layers=3,
  dec_ffn=32,
  ti_layers=2,
  k1=60,
  k2=30,
  guiding_tokens=10,
  dn_num=20,
  detections_per_image=100,
)
# Two images, padded to a common 64 x 96 canvas; 'orig_hw' is the size predictions are resized back to.
IMAGES = (
  dict(image_hw=(64, 96), orig_hw=(80, 120)),
  dict(image_hw=(52, 80), orig_hw=(65, 100)),
)
CANVAS = (64, 96)
SEED = 20261122


def encode_state_dict(sd: dict) -> dict:
  """{key: float32 array} (values already on the grid for big tensors) -> arrays for np.savez_compressed."""
  out, seen = {}, {}
  for k, v in sd.items():
    v = np.asarray(v, np.float32)
    digest = (v.shape, v.tobytes())
    if digest in seen:  # a shared module's duplicate name: stored once, as a reference
      out[f'a:{k}'] = np.asarray(seen[digest])
      continue
    seen[digest] = k
    if v.size >= QUANTIZE_MIN:
      scale = np.float32(np.abs(v).max() / 1.5)
      codes = np.rint(v / scale + 1.5).astype(np.uint8)
      if not np.array_equal(((codes.astype(np.float32) - 1.5) * scale).astype(np.float32), v):
        raise ValueError(f'{k}: values are not on the 4-level grid')
      flat = np.concatenate([codes.reshape(-1), np.zeros((-codes.size) % 4, np.uint8)]).reshape(-1, 4)
      out[f'q:{k}'] = flat[:, 0] | (flat[:, 1] << 2) | (flat[:, 2] << 4) | (flat[:, 3] << 6)
      out[f's:{k}'] = np.asarray([scale], np.float32)
      out[f'shape:{k}'] = np.asarray(v.shape, np.int64)
    else:
      out[f'f:{k}'] = v
  return out


def decode_state_dict(npz) -> dict:
  """The inverse of encode_state_dict: {key: float32 array} in the official (torch) layout."""
  sd = {}
  for name in npz.files:
    kind, key = name.split(':', 1)
    if kind == 'f':
      sd[key] = np.asarray(npz[name], np.float32)
    elif kind == 'q':
      packed = npz[name]
      codes = np.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], -1).reshape(-1)
      shape = tuple(int(x) for x in npz[f'shape:{key}'])
      codes = codes[: int(np.prod(shape))].reshape(shape)
      scale = np.float32(npz[f's:{key}'][0])
      sd[key] = ((codes.astype(np.float32) - 1.5) * scale).astype(np.float32)
  for name in npz.files:
    kind, key = name.split(':', 1)
    if kind == 'a':
      sd[key] = sd[str(npz[name])].copy()
  return sd


def on_grid(rng, shape, std):
  """Random 4-level values with about the given standard deviation ((code - 1.5) * s has std 1.118 s; s is a power
  of two so that the encoding's scale max|v| / 1.5 recovers it exactly)."""
  scale = np.float32(2.0 ** np.round(np.log2(std / np.sqrt(1.25))))
  codes = rng.integers(0, 4, size=shape)
  return ((codes.astype(np.float32) - 1.5) * scale).astype(np.float32)


# ------------------------------------------------------------------------------------------------ full size
# The official R50 COCO configuration (configs/dimaskdino_r50_coco.py): 52,286,232 parameters.
FULL = dict(
  num_classes=80,
  hidden_dim=256,
  stem_width=64,
  width=64,
  res2_out_channels=256,
  enc_layers=6,
  enc_ffn=2048,
  dec_layers=6,
  dec_ffn=2048,
  ti_layers=2,
  k1=600,
  k2=300,
  guiding_tokens=50,
  dn_num=100,
  detections_per_image=100,
)
FULL_SEED = 20261203
# scikit-image's bundled photographs (skimage.data function names): 1:1, 3:2 and 1.5:1 at three sizes.
PHOTOS = ('astronaut', 'coffee', 'chelsea')
SAMPLES = 8192  # elements kept of a summarized stage
WHOLE_MAX = 65536  # stages with at most this many elements are kept whole


def photos(names=PHOTOS, short_edge=800, max_size=1333):
  """The official test-time input: each photograph resized like detectron2's ResizeShortestEdge(short_edge,
  max_size) (its size rule, PIL bilinear on uint8). Returns [(H, W, 3) uint8 RGB], [(h, w) original size]."""
  import skimage.data

  from dimaskdino_jax.data.transforms import resize_image, shortest_edge_hw

  images, orig = [], []
  for name in names:
    img = getattr(skimage.data, name)()  # (h, w, 3) uint8
    h, w = img.shape[:2]
    images.append(resize_image(img, shortest_edge_hw(h, w, short_edge, max_size)))
    orig.append((h, w))
  return images, orig


def draw_state_dict(entries, aliases, seed):
  """Random weights for the official model drawn from `seed` alone, so that the fixture script (which loads them
  into the official model) and the test (which converts them into ours) hold the same numbers without shipping
  them. entries: [(key, shape, is_buffer)] in a fixed order (the official named_parameters, then named_buffers);
  aliases: {duplicate key of a shared module: key drawn}. Rules (as make_fixtures.randomize, except that biases are
  drawn around zero rather than around the official initial values, which the test cannot know):
  * weights with >= 2 dims: std sqrt(gain / fan_in) (gain 2 in the backbone, fan_in 1 for the level embedding),
    on the 4-level grid when they have >= QUANTIZE_MIN elements (cheap to draw), else normal;
  * other parameters: norm scales U(0.5, 1.5), biases N(0, 0.2^2);
  * FrozenBN buffers: mean N(0, 0.2^2), var U(0.5, 2), scale U(0.5, 1.5), bias N(0, 0.2^2).
  Returns {key: float32 array} including the aliases."""
  rng = np.random.default_rng(seed)
  sd = {}
  for key, shape, is_buffer in entries:
    shape = tuple(int(s) for s in shape)
    if is_buffer:
      if key.endswith('running_mean') or (key.startswith('backbone.') and key.endswith('bias')):
        value = 0.2 * rng.standard_normal(shape)
      elif key.endswith('running_var'):
        value = rng.uniform(0.5, 2.0, shape)
      elif key.startswith('backbone.') and key.endswith('weight'):
        value = rng.uniform(0.5, 1.5, shape)
      else:
        raise ValueError(f'draw_state_dict: no rule for buffer {key}')
    elif len(shape) >= 2:
      fan_in = int(np.prod(shape[1:])) if 'level_embed' not in key else 1
      std = float(np.sqrt((2.0 if key.startswith('backbone.') else 1.0) / fan_in))
      if int(np.prod(shape)) >= QUANTIZE_MIN:
        value = on_grid(rng, shape, std)
      else:
        value = rng.standard_normal(shape) * std
    elif key.endswith('weight'):
      value = rng.uniform(0.5, 1.5, shape)
    else:
      value = 0.2 * rng.standard_normal(shape)
    sd[key] = np.asarray(value, np.float32)
  for dup, key in aliases.items():
    sd[dup] = sd[key]
  return sd


def sample_index(size, seed):
  """SAMPLES flat indices (sorted, without repeats) into a tensor of `size` elements, the same on both sides."""
  rng = np.random.default_rng([seed, size])
  return np.sort(rng.choice(size, size=min(SAMPLES, size), replace=False))


def summary_keys(name):
  return f'{name}:values', f'{name}:absmax', f'{name}:channel_mean'


def summarize(name, x, seed):
  """A stage as kept in the full-size fixtures: whole if small, else SAMPLES elements at sample_index, the max |x|
  of the whole tensor and the mean of every channel (last axis) over all other axes. float64 statistics."""
  x = np.asarray(x, np.float32)
  if x.size <= WHOLE_MAX:
    return {name: x}
  values, absmax, chan = summary_keys(name)
  return {
    values: x.reshape(-1)[sample_index(x.size, seed)],
    absmax: np.asarray(np.max(np.abs(x)), np.float64),
    chan: np.mean(x.reshape(-1, x.shape[-1]), axis=0, dtype=np.float64),
    f'{name}:shape': np.asarray(x.shape, np.int64),
  }
