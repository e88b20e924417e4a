"""Compiled peak memory of one training step per image (XLA `memory_analysis()`), without running it.

  python benchmarks/memory.py [--config configs/dimaskdino_r50_coco.py:12ep] [--batch_size 1]
      [--variants base,remat,remat_bf16] [--dump_to DIR] [--top 25]

For each variant (base: as configured; remat: model.remat = True, encoder / decoder layers rematerialized in the
backward pass; bf16: model.backbone.dtype = 'bfloat16'; remat_bf16: both) the train step (forward, losses with the
host matching callback, AdamW update, state donated) is traced on abstract inputs (no params are materialized),
lowered and compiled for the default backend, and XLA's buffer assignment is read: temp (activations and
intermediates), arguments (state + batch), outputs, aliased (donated state reused for the new state). Peak =
arguments + outputs + temp - aliased. Per image = peak / batch. No FLOPs are spent; compiling the R50 step at
1024 x 1024 takes minutes on CPU.

--dump_to DIR also dumps XLA's buffer assignment of each compiled step (XLA_FLAGS --xla_dump_to, set before jax is
imported) and prints what is live at the peak of the temp allocation, summed by the model part that made each
buffer (the Flax module path in the op's name: backbone, encoder layer i, decoder layer i, losses, ...) and the
largest single buffers (`peak_report`).
"""

import collections
import glob
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dimaskdino_jax import runtime  # noqa: E402

runtime.configure(restart=__name__ == '__main__')  # XLA_FLAGS; malloc tunables (a restart) as a script
for _arg in sys.argv[1:]:  # the dump flag must reach XLA before jax is imported
  if _arg.startswith('--dump_to='):
    os.environ['XLA_FLAGS'] += f' --xla_dump_to={_arg.split("=", 1)[1]} --xla_dump_hlo_module_re=.*step_fn.*'

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dimaskdino_jax.modeling.model import build_model  # noqa: E402
from dimaskdino_jax.training import optimizer as optim_lib  # noqa: E402
from dimaskdino_jax.training.trainer import TARGET_KEYS, abstract_params, init_state, make_train_step  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/dimaskdino_r50_coco.py:12ep', 'config file')
_BS = flags.DEFINE_integer('batch_size', 1, 'images per step (per device)')
_VARIANTS = flags.DEFINE_list('variants', ['base', 'remat', 'bf16', 'remat_bf16'], 'variants to compile')
_DUMP = flags.DEFINE_string('dump_to', None, 'dump XLA buffer assignments here and report the buffers at the peak')
_TOP = flags.DEFINE_integer('top', 25, 'rows of the peak report')

GIB = 2**30


def abstract_batch(config, bsz):
  s, g, st = config.data.image_size, config.data.max_instances, config.data.mask_stride
  batch = {
    'image': jax.ShapeDtypeStruct((bsz, s, s, 3), jnp.uint8),
    'boxes': jax.ShapeDtypeStruct((bsz, g, 4), jnp.float32),
    'labels': jax.ShapeDtypeStruct((bsz, g), jnp.int32),
    'valid': jax.ShapeDtypeStruct((bsz, g), jnp.bool_),
    'masks': jax.ShapeDtypeStruct((bsz, g, s // st, s // st), jnp.uint8),
  }
  return {k: v for k, v in batch.items() if k in ('image', *TARGET_KEYS)}


def measure(config, bsz):
  model = build_model(config)
  shape = (bsz, config.data.image_size, config.data.image_size, 3)
  tx = optim_lib.build_optimizer(config, abstract_params(model, shape))
  state = jax.eval_shape(lambda: init_state(config, model, tx, shape))
  step = jax.jit(make_train_step(config, model, tx), donate_argnums=0)
  t0 = time.perf_counter()
  lowered = step.trace(state, abstract_batch(config, bsz)).lower()
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  m = compiled.memory_analysis()
  peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  return {
    'lower_s': t1 - t0,
    'compile_s': t2 - t1,
    'temp': m.temp_size_in_bytes,
    'args': m.argument_size_in_bytes,
    'out': m.output_size_in_bytes,
    'alias': m.alias_size_in_bytes,
    'peak': peak,
  }


_PART_PATTERNS = (  # (name, regex on the op name); the first match names the part
  ('optimizer / state', r'^jit\(step_fn\)/(?!.*(jvp|transpose)\()'),
  ('backbone', r'/backbone/'),
  ('encoder layer {}', r'/encoder_layers_(\d+)/'),
  ('pixel decoder (mask branch, input projections)', r'/pixel_decoder/'),
  ('decoder layer {}', r'/decoder_layers_(\d+)/'),
  ('predictor (heads, selection, DI, BATO, masks)', r'/predictor/'),
  ('losses + matcher', r'/(compute_losses|hungarian|point_sample|criterion)|jvp\(\)/(?!.*DIMaskDINO)'),
)


def _part(op_name: str) -> str:
  direction = 'backward' if 'transpose(' in op_name else 'forward'
  if direction == 'backward' and '/checkpoint/' in op_name:
    direction = 'backward, rematerialized'
  for name, pattern in _PART_PATTERNS:
    m = re.search(pattern, op_name)
    if m:
      return f'{name.format(*m.groups())} ({direction})'
  return f'other ({direction})'


def peak_report(dump_dir: str, top: int = 25) -> str:
  """The newest step module in `dump_dir`: the buffers live at XLA's peak (live-range file), with the op names
  of their instructions (buffer-assignment values file), summed per model part, and the largest ones."""
  ranges = sorted(
    glob.glob(os.path.join(dump_dir, '*step_fn*cpu_after_optimizations-live-range.txt')), key=os.path.getmtime
  )
  if not ranges:
    return f'no live-range dump in {dump_dir}'
  live = ranges[-1]
  text = open(live).read()
  peak = text.split('(peak):', 1)[1].split('Stack trace breakdown', 1)[0]
  at_peak = [(m.group(1), int(m.group(2))) for m in re.finditer(r'^\s+(\S+)\{[^}]*\}: (\d+) bytes', peak, re.M)]
  op_names = {}
  values = live.replace('-live-range.txt', '-buffer-assignment-values.txt')
  for m in re.finditer(r'from instruction: %(\S+) = .*?op_name="([^"]*)"', open(values).read()):
    op_names[m.group(1)] = m.group(2)
  by_part = collections.Counter()
  for name, size in at_peak:
    by_part[_part(op_names.get(name, name))] += size
  total = sum(size for _, size in at_peak)
  lines = [f'{os.path.basename(live)}: {len(at_peak)} buffers live at the peak, {total / GIB:.2f} GiB', '']
  lines += ['| part | GiB at the peak | share |', '|---|---|---|']
  for part, size in by_part.most_common(top):
    lines.append(f'| {part} | {size / GIB:.2f} | {size / total:.0%} |')
  lines += ['', '| largest buffers at the peak | MiB | op |', '|---|---|---|']
  for name, size in sorted(at_peak, key=lambda x: -x[1])[:top]:
    lines.append(f'| {name} | {size / 2**20:.0f} | {op_names.get(name, "?")[-140:]} |')
  return '\n'.join(lines)


def main(argv):
  del argv
  bsz = _BS.value
  c = _CONFIG.value
  print(f'config {c.name} canvas {c.data.image_size} batch {bsz} backend {jax.default_backend()}')
  print('| variant | temp GiB | args GiB | out GiB | aliased GiB | peak GiB | peak / image GiB | compile s |')
  print('|---|---|---|---|---|---|---|---|')
  for variant in _VARIANTS.value:
    config = _CONFIG.value.copy_and_resolve_references()
    config.model.remat = 'remat' in variant
    config.model.backbone.dtype = 'bfloat16' if 'bf16' in variant else 'float32'
    r = measure(config, bsz)
    print(
      f'| {variant} | {r["temp"] / GIB:.2f} | {r["args"] / GIB:.2f} | {r["out"] / GIB:.2f} | {r["alias"] / GIB:.2f} '
      f'| {r["peak"] / GIB:.2f} | {r["peak"] / GIB / bsz:.2f} | {r["compile_s"]:.0f} |',
      flush=True,
    )
    if _DUMP.value:
      print(peak_report(_DUMP.value, _TOP.value), flush=True)


if __name__ == '__main__':
  app.run(main)
