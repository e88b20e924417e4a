"""Multi-scale deformable attention (Deformable DETR's `ms_deform_attn_core`), one signature, several impls.

`ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, impl='auto',
value_bias=None)`

* value: (N, S, M, D), S = sum of H_l * W_l, each level flattened row-major (h, w), levels concatenated in the
  given order.
* spatial_shapes: static ((H_0, W_0), ...) python ints (a numpy array is converted); never a traced value.
* level_start_index: static offsets of each level in S, or None to derive them from spatial_shapes.
* sampling_locations: (N, Lq, M, L, P, 2), normalized, last dim (x, y), (0, 0) the top-left corner of the map;
  values outside [0, 1] are allowed (they sample zeros).
* attention_weights: (N, Lq, M, L, P), already normalized by the caller.
* returns (N, Lq, M * D) in value's dtype, heads concatenated in order; accumulation is float32.
* value_bias: None, or (M, D) added to every value row before sampling (the value projection's bias; the
  'xla' impl adds it to the gathered rows instead, a large speed-up on XLA:CPU: xla.py).

Semantics are torch `grid_sample(mode='bilinear', padding_mode='zeros', align_corners=False)` per level:
pixel x = loc_x * W - 0.5, y = loc_y * H - 0.5, four neighbours, a neighbour outside the map contributes 0
(docs/architecture.md, "Deformable attention").

impl: 'xla' (fast pure JAX, hand-written VJP), 'dense' (dense sampling matrices and matrix products: fastest on
CPU for small maps, see dense.py), 'reference' (straightforward pure JAX, autodiff; the test
oracle), 'pallas' (Pallas/Triton kernels for the forward and the backward, the value gradient by atomic adds on
GPU and by the pure-JAX scatter-add elsewhere; runs with interpret=True off GPU),
'auto' (on GPU: 'pallas', or 'xla' with `PALLAS_ON_GPU` off; elsewhere 'dense' when its
sampling matrix is small (`dense_fits`), else 'xla').

The platform that decides 'auto' and Pallas' interpret mode is the default backend, or, inside
`lowering_for(platforms)`, the platforms a trace is lowered for (`jax.export` for CUDA from a CPU machine): one GPU
platform picks as on a GPU (the Triton kernel itself for 'pallas'); CPU and GPU together pick 'xla', which runs on
both.
"""

import contextlib
import functools

import jax
import numpy as np

from kernels.ms_deform_attn.dense import dense_fits, ms_deform_attn_dense
from kernels.ms_deform_attn.reference import ms_deform_attn_reference
from kernels.ms_deform_attn.xla import CHUNK_BYTES, ms_deform_attn_xla
from kernels.per_shard import data_size, per_shard

__all__ = [
  'IMPLS',
  'TRITON_CALL',
  'lowering_for',
  'target_platforms',
  'ms_deform_attn',
  'ms_deform_attn_dense',
  'ms_deform_attn_reference',
  'ms_deform_attn_xla',
  'normalize_shapes',
]

IMPLS = ('auto', 'xla', 'dense', 'reference', 'pallas')
# Whether 'auto' picks the Pallas kernels on GPU (else the XLA formulation). On: they are tested in interpret mode
# against the float64 oracle and compiled without a GPU to sm_80 / sm_90a machine code (cuda_compile.py), but no
# GPU has run them in this project yet; `impl='xla'` (config: model.msda_impl) opts out.
PALLAS_ON_GPU = True

# The custom-call target of a Pallas/Triton kernel lowered for a GPU (it carries the kernel's Triton IR).
TRITON_CALL = '__gpu$xla.gpu.triton'

_LOWERING_FOR: list[tuple[str, ...]] = []  # the stack of `lowering_for` platforms (innermost last)
_GPU_PLATFORMS = ('cuda', 'rocm', 'gpu')


@contextlib.contextmanager
def lowering_for(platforms):
  """Within the block, traces pick their implementation for `platforms` (e.g. ('cuda',) or ('cpu', 'cuda'))
  instead of the default backend. None = no change. For GPU platforms only, on a machine without a GPU, jax >= 0.11
  also gets an abstract GPU device (`gpu_target_without_gpu`)."""
  if platforms is None:
    yield
    return
  platforms = tuple(str(p).lower() for p in platforms)
  if not platforms:
    raise ValueError('lowering_for: platforms must be non-empty (or None)')
  _LOWERING_FOR.append(platforms)
  try:
    with gpu_target_without_gpu(platforms):
      yield
  finally:
    _LOWERING_FOR.pop()


def gpu_target_without_gpu(platforms):
  """A context in which jax >= 0.11 lowers Pallas to Triton for `platforms` (GPU ones) without a GPU: its Triton
  lowering reads the target from the device, or, with none, from an abstract mesh's abstract device (here an H100,
  compute capability 9.0, one device on an axis that is not `data`). jax 0.10 needs none; nor does a GPU machine."""
  gpu_only = all(p in _GPU_PLATFORMS for p in platforms)
  if not gpu_only or jax.default_backend() == 'gpu' or jax.__version_info__ < (0, 11):
    return contextlib.nullcontext()
  from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

  device = AbstractDevice(device_kind='NVIDIA H100', num_cores=132, platform='gpu')
  return use_abstract_mesh(AbstractMesh((1,), ('gpu_target',), abstract_device=device))


def target_platforms() -> tuple[str, ...]:
  """The platforms traces are lowered for: the innermost `lowering_for`, else the default backend."""
  return _LOWERING_FOR[-1] if _LOWERING_FOR else (jax.default_backend(),)


def _on_gpu_only() -> bool:
  return all(p in _GPU_PLATFORMS for p in target_platforms())


# Jitted with the static level layout, so eager calls compile once per shape (and inline under an outer jit).
_xla = jax.jit(ms_deform_attn_xla, static_argnums=(1, 2, 5))  # (value, shapes, starts, loc, attn, chunk, bias)
_reference = jax.jit(ms_deform_attn_reference, static_argnums=(1, 2))
_dense = jax.jit(ms_deform_attn_dense, static_argnums=(1, 2))


@functools.cache
def _pallas():
  from kernels.ms_deform_attn.pallas import ms_deform_attn_pallas  # imported lazily: Pallas is GPU-oriented

  return jax.jit(ms_deform_attn_pallas, static_argnums=(1, 2, 5))


def normalize_shapes(spatial_shapes, level_start_index=None):
  """Returns (spatial_shapes, level_start_index) as tuples of python ints, checked for consistency."""
  if isinstance(spatial_shapes, jax.core.Tracer):
    raise TypeError(
      'ms_deform_attn: spatial_shapes must be static (a tuple of (H, W) python ints or a numpy array), '
      'not a traced jax value; pass it as a python constant or mark it static in jax.jit.'
    )
  try:
    shapes = tuple((int(h), int(w)) for h, w in np.asarray(spatial_shapes).reshape(-1, 2).tolist())
  except (TypeError, ValueError) as e:
    raise TypeError(f'ms_deform_attn: spatial_shapes must be ((H, W), ...) ints, got {spatial_shapes!r}') from e
  if not shapes or any(h <= 0 or w <= 0 for h, w in shapes):
    raise ValueError(f'ms_deform_attn: spatial_shapes must be a non-empty list of positive (H, W), got {shapes}')
  starts = tuple(int(x) for x in np.cumsum([0] + [h * w for h, w in shapes[:-1]]))
  if level_start_index is not None:
    if isinstance(level_start_index, jax.core.Tracer):
      raise TypeError('ms_deform_attn: level_start_index must be static (python ints or numpy), or None.')
    given = tuple(int(x) for x in np.asarray(level_start_index).reshape(-1).tolist())
    if given != starts:
      raise ValueError(
        f'ms_deform_attn: level_start_index {given} does not match spatial_shapes {shapes} '
        f'(expected {starts}); levels must be concatenated in order without gaps.'
      )
  return shapes, starts


def _check(value, shapes, starts, sampling_locations, attention_weights):
  if value.ndim != 4:
    raise ValueError(f'ms_deform_attn: value must be (N, S, M, D), got shape {value.shape}')
  n, s, m, _ = value.shape
  total = starts[-1] + shapes[-1][0] * shapes[-1][1]
  if s != total:
    raise ValueError(f'ms_deform_attn: value has S={s} tokens but spatial_shapes {shapes} sum to {total}')
  nl = len(shapes)
  if sampling_locations.ndim != 6 or sampling_locations.shape[-1] != 2:
    raise ValueError(f'ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got {sampling_locations.shape}')
  ln, lq, lm, ll, lp, _ = sampling_locations.shape
  if (ln, lm, ll) != (n, m, nl):
    raise ValueError(
      f'ms_deform_attn: sampling_locations {sampling_locations.shape} does not match value {value.shape} '
      f'and {nl} levels (need N={n}, M={m}, L={nl})'
    )
  if attention_weights.shape != (n, lq, m, nl, lp):
    raise ValueError(
      f'ms_deform_attn: attention_weights must be {(n, lq, m, nl, lp)} to match sampling_locations, '
      f'got {attention_weights.shape}'
    )


def _resolve(impl, value, sampling_locations):
  if impl not in IMPLS:
    raise ValueError(f'ms_deform_attn: impl must be one of {IMPLS}, got {impl!r}')
  targets = target_platforms()
  if impl == 'pallas' and len(targets) > 1 and any(p in _GPU_PLATFORMS for p in targets):
    raise ValueError(
      f"ms_deform_attn: impl='pallas' cannot be lowered for {targets} at once (the Triton kernel runs on a GPU "
      "only); lower for the GPU platform alone, or use impl='xla' (runs on every platform)"
    )
  if impl == 'auto':
    if _on_gpu_only():
      return 'pallas' if PALLAS_ON_GPU else 'xla'
    if len(targets) > 1:  # CPU and GPU in one lowering: the formulation that is good on both
      return 'xla'
    n, s, m, _ = value.shape
    return 'dense' if dense_fits(n, sampling_locations.shape[1], m, s) else 'xla'
  return impl


def ms_deform_attn(
  value, spatial_shapes, level_start_index, sampling_locations, attention_weights, impl='auto', value_bias=None
):
  """Multi-scale deformable attention; see the module docstring for shapes and semantics.

  Under a data-parallel mesh (`jax.set_mesh` with a `data` axis > 1 at trace time) the op runs on each device's
  shard of the batch (`jax.shard_map`, kernels/per_shard.py), and 'auto' chooses by the per-shard size.
  """
  shapes, starts = normalize_shapes(spatial_shapes, level_start_index)
  _check(value, shapes, starts, sampling_locations, attention_weights)
  if value_bias is not None and tuple(value_bias.shape) != tuple(value.shape[2:]):
    raise ValueError(f'ms_deform_attn: value_bias must be (M, D) = {value.shape[2:]}, got {value_bias.shape}')
  # The implementation, chosen once by the size of one data shard (what `run` gets on each device).
  shard = jax.ShapeDtypeStruct((max(1, value.shape[0] // data_size()), *value.shape[1:]), value.dtype)
  chosen = _resolve(impl, shard, sampling_locations)
  if value_bias is not None and chosen != 'xla':
    # Only 'xla' takes the bias apart; for the others it is added here, outside the per-shard map, as the value
    # projection would (inside, a replicated bias would need a cross-device sum of its gradient in every call).
    value, value_bias = value + value_bias.astype(value.dtype), None

  def run(value, sampling_locations, attention_weights, *bias):
    value_bias = bias[0] if bias else None
    if chosen == 'xla':
      # The value gradient: one scatter on a GPU, chunked on CPUs (xla.value_grad).
      chunk = None if _on_gpu_only() else CHUNK_BYTES
      return _xla(value, shapes, starts, sampling_locations, attention_weights, chunk, value_bias)
    if chosen == 'dense':
      return _dense(value, shapes, starts, sampling_locations, attention_weights)
    if chosen == 'reference':
      return _reference(value, shapes, starts, sampling_locations, attention_weights)
    # 'pallas': the Triton kernel on GPU, the same kernel interpreted as XLA ops elsewhere (slow; tests).
    interpret = not _on_gpu_only()
    return _pallas()(value, shapes, starts, sampling_locations, attention_weights, interpret)

  bias = () if value_bias is None else (value_bias,)  # 'xla': replicated over the data shards
  return per_shard(run, (0, 0, 0) + (None,) * len(bias), 0)(value, sampling_locations, attention_weights, *bias)
