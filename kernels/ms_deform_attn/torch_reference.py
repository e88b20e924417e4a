"""PyTorch pure reference of multi-scale deformable attention (for benchmarks and parity tests only).

Written after Deformable DETR's `ms_deform_attn_core_pytorch`: `F.grid_sample(bilinear, zeros,
align_corners=False)` per level on (N*M, D, H, W) maps with grid = 2 * loc - 1 (docs/architecture.md, "Deformable
attention"). torch is imported lazily: this module is never imported by the JAX code paths.
"""


def ms_deform_attn_torch(value, spatial_shapes, sampling_locations, attention_weights):
  """value (N, S, M, D); locations (N, Lq, M, L, P, 2); weights (N, Lq, M, L, P) torch tensors -> (N, Lq, M * D)."""
  import torch
  import torch.nn.functional as F

  n, _, m, d = value.shape
  _, lq, _, nl, p, _ = sampling_locations.shape
  values = value.split([h * w for h, w in spatial_shapes], dim=1)
  grids = 2 * sampling_locations - 1
  samples = []
  for lvl, (h, w) in enumerate(spatial_shapes):
    v = values[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)  # (N*M, D, H, W)
    g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (N*M, Lq, P, 2)
    samples.append(F.grid_sample(v, g, mode='bilinear', padding_mode='zeros', align_corners=False))
  a = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, nl * p)
  out = (torch.stack(samples, dim=-2).flatten(-2) * a).sum(-1).view(n, m * d, lq)
  return out.transpose(1, 2).contiguous()
