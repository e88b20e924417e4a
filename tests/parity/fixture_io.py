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
