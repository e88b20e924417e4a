r"""Where the time of a jitted R50 inference or training step goes, by model stage (XLA:CPU or GPU trace).

  python benchmarks/profile_ops.py --task infer [--canvas 800 1216] [--depth 3] [--json OUT]
  python benchmarks/profile_ops.py --task train [--depth 3] [--json OUT]
  python benchmarks/profile_ops.py --task demo-train [--config configs/shapes.py] [--depth 3]
  python benchmarks/profile_ops.py --task official-infer --official PATH --detectron2 PATH [--runs 3]
  python benchmarks/profile_ops.py --task official-train --official PATH --detectron2 PATH

The same model, weights and inputs as benchmarks/vs_official.py (the official R50 COCO model drawn from
tests/parity/fixture_io.FULL_SEED; inference: skimage's coffee at 800 x 1200 on an 800 x 1216 canvas; training: its
two 512 x 512 photographs with 3 and 5 instances and train.py's jitted step). One call is traced with
`jax.profiler.trace` after --warmup untraced calls (default 1); every XLA op of the trace is attributed to the model
path in its HLO metadata (`op_name`, e.g. `pixel_decoder/encoder_layers_3/self_attn`), cut to --depth components
after the transformations (jvp / transpose / checkpoint) are removed, and summed. Prints a table of the stages by time
(milliseconds of op execution, summed over the threads that ran them, and the share of the total op time) and the
ten most expensive single ops; host callbacks (the Hungarian matching) appear under their own name.

--task demo-train traces train.py's step of a config (default the CPU demo's, configs/shapes.py) on one device, on a
fake batch of the config's batch size and canvas (benchmarks/train_step.fake_batch).

--task official-infer times the official model's inference on the same image by its modules (forward hooks on the
backbone, the pixel decoder and its deformable encoder, the transformer decoder; the rest of the call is the
official pre- and post-processing), median of --runs after a warm-up, torch with all cores.

--task official-train profiles one official training step (vs_official's: batch 2, 512 x 512, SetCriterion,
backward, AdamW) after a warm-up step with torch.profiler, 2 threads as vs_official: the aten ops by self CPU
time, and their sum by kind (matrix products, convolutions, grid_sample, the rest).
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from dimaskdino_jax import runtime  # noqa: E402

runtime.configure(restart=__name__ == '__main__')  # XLA_FLAGS; malloc tunables (a restart) as a script
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

# Parts of an op_name that are transformations, not model structure.
_TRANSFORM = re.compile(
  r'^(jit\(.*\)|jvp\(.*\)|transpose\(.*\)|checkpoint|remat|rematted_computation|vmap\(.*\)|pjit)$'
)


def op_paths(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> op_name metadata, from a compiled module's text."""
  out = {}
  for m in re.finditer(r'%([\w.\-]+) = [^\n]*?metadata=\{op_name="([^"]*)"', hlo_text):
    out.setdefault(m.group(1), m.group(2))
  return out


def stage_of(op_name: str, depth: int) -> str:
  """'jit(step)/jvp(DIMaskDINO)/pixel_decoder/encoder_layers_3/self_attn/jit(ms_deform_attn_xla)/gather' ->
  'pixel_decoder/encoder_layers_3/self_attn' at depth 3 (a backward op keeps its forward op's path)."""
  parts = [p for p in op_name.split('/') if p and not _TRANSFORM.match(p)]
  if parts and parts[0] in ('DIMaskDINO', 'model'):
    parts = parts[1:]
  return '/'.join(parts[:depth]) or '(outside the model)'


def trace_op_times(fn, args, out_dir) -> dict[str, tuple[float, int]]:
  """hlo_op -> (total ms, count) of one traced call of fn(*args)."""
  with jax.profiler.trace(out_dir, create_perfetto_trace=True):
    jax.block_until_ready(fn(*args))
  (path,) = glob.glob(os.path.join(out_dir, '**', 'perfetto_trace.json.gz'), recursive=True)
  with gzip.open(path) as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  times = collections.defaultdict(lambda: [0.0, 0])
  for e in events:
    op = (e.get('args') or {}).get('hlo_op')
    if e.get('ph') == 'X' and op:
      times[op][0] += e.get('dur', 0) / 1e3
      times[op][1] += 1
  return {k: (v[0], v[1]) for k, v in times.items()}


def infer_call(canvas_hw):
  import vs_official as vo

  from dimaskdino_jax.modeling.model import build_model

  config = vo.our_config(False)
  variables = vo.our_variables(config)
  model = build_model(config)
  image = vo.infer_image()
  canvas = np.zeros((1, *canvas_hw, 3), np.uint8)
  canvas[0, : image.shape[0], : image.shape[1]] = image
  hw = np.array([image.shape[:2]], np.int32)
  fn = jax.jit(lambda v, x, hw: model.apply(v, x, image_hw=hw, train=False))
  return fn, (variables, jnp.asarray(canvas), jnp.asarray(hw))


def train_call():
  import vs_official as vo

  step, state, batch = vo.our_train_step()
  return step, (state, batch)


def demo_train_call(config_path):
  """(jitted train step donating its state, state, batch): a config's step (default the demo's) on a fake batch."""
  import train_step as ts

  from dimaskdino_jax.config import load_config
  from dimaskdino_jax.modeling.model import build_model
  from dimaskdino_jax.training import optimizer as optim_lib
  from dimaskdino_jax.training import partition
  from dimaskdino_jax.training.trainer import batch_to_device, init_state, make_train_step

  config = load_config(config_path)
  bsz, s = config.train.batch_size, config.data.image_size
  model = build_model(config)
  params_shape = jax.eval_shape(
    lambda i: model.init({'params': jax.random.key(0), 'dn': jax.random.key(1)}, i),
    jax.ShapeDtypeStruct((bsz, s, s, 3), jnp.uint8),
  )['params']
  tx = optim_lib.build_optimizer(config, partition.trainable_params(config, params_shape))
  state = init_state(config, model, tx, (bsz, s, s, 3))
  batch = batch_to_device(ts.fake_batch(config, bsz, np.random.default_rng(0)))
  return jax.jit(make_train_step(config, model, tx), donate_argnums=0), state, batch


def official_infer_stages(official, detectron2, runs):
  """Median ms of the official model's stages on the inference image (forward hooks; CPU, so synchronous)."""
  import torch
  import vs_official as vo

  args = argparse.Namespace(official=official, detectron2=detectron2, threads=os.cpu_count(), device='cpu')
  model = vo.official_model(args).eval()
  # (module, method) per stage; the pixel decoder is entered through forward_features, so methods are wrapped.
  stages = {
    'backbone': (model.backbone, 'forward'),
    'pixel_decoder (deformable encoder + mask features)': (model.sem_seg_head.pixel_decoder, 'forward_features'),
    'pixel_decoder: deformable encoder': (model.sem_seg_head.pixel_decoder.transformer, 'forward'),
    'predictor (DI, BATO, decoder, heads)': (model.sem_seg_head.predictor, 'forward'),
  }
  spans = collections.defaultdict(list)

  def timed(name, method):
    def wrapper(*a, **k):
      t0 = time.perf_counter()
      out = method(*a, **k)
      spans[name].append(time.perf_counter() - t0)
      return out

    return wrapper

  for name, (module, attr) in stages.items():
    setattr(module, attr, timed(name, getattr(module, attr)))
  image = vo.infer_image()
  inputs = [{'image': torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()}]
  inputs[0].update(height=image.shape[0], width=image.shape[1])
  totals = []
  with torch.no_grad():
    for _ in range(runs + 1):
      t0 = time.perf_counter()
      model(inputs)[0]['instances'].pred_masks.sum().item()
      totals.append(time.perf_counter() - t0)
  out = {name: 1e3 * float(np.median(v[1:])) for name, v in spans.items()}
  out['whole call'] = 1e3 * float(np.median(totals[1:]))
  top = ('backbone', 'pixel_decoder (deformable encoder + mask features)', 'predictor (DI, BATO, decoder, heads)')
  out['rest (pre- and post-processing)'] = out['whole call'] - sum(out[k] for k in top)
  print(
    f'official inference by module, median of {runs} after a warm-up (torch {torch.__version__}, '
    f'{torch.get_num_threads()} threads)\n| module | ms |\n|---|---|'
  )
  for name, ms in out.items():
    print(f'| {name} | {ms:.0f} |')
  return out


# aten op name prefixes -> kind, for the official training step's summary (first match wins).
_ATEN_KINDS = (
  ('matrix products', ('aten::mm', 'aten::bmm', 'aten::addmm', 'aten::linear')),
  ('convolutions', ('aten::convolution_backward', 'aten::mkldnn_convolution', 'aten::_convolution')),
  ('grid_sample (deformable attention, point sampling)', ('aten::grid_sampler',)),
  ('top-k', ('aten::topk',)),
)


def official_train_ops(official, detectron2, threads=2):
  """Self CPU ms of the aten ops of one official training step (after one warm-up step), and their kinds."""
  import torch
  import vs_official as vo
  from torch.profiler import ProfilerActivity, profile

  args = argparse.Namespace(official=official, detectron2=detectron2, threads=threads, device='cpu')
  step = vo.official_train_step(args)
  step()
  t0 = time.perf_counter()
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    step()
  wall = time.perf_counter() - t0
  ops = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
  kinds = collections.defaultdict(float)
  for name, ms in ops.items():
    kind = next((k for k, prefixes in _ATEN_KINDS if name.startswith(prefixes)), 'the rest (elementwise, copies, ...)')
    kinds[kind] += ms
  total = sum(ops.values())
  print(
    f'official training step (torch {torch.__version__}, {torch.get_num_threads()} threads): profiled call '
    f'{wall:.2f} s wall, {total / 1e3:.2f} s self CPU time of aten ops\n| kind | ms | share |\n|---|---|---|'
  )
  for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1]):
    print(f'| {kind} | {ms:.0f} | {100 * ms / total:.1f} % |')
  print('\nmost expensive aten ops (self CPU ms):')
  for name, ms in sorted(ops.items(), key=lambda kv: -kv[1])[:15]:
    print(f'  {ms:8.0f} ms {name}')
  return {'wall_s': wall, 'kinds_ms': dict(kinds), 'ops_ms': ops}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    '--task', choices=('infer', 'train', 'demo-train', 'official-infer', 'official-train'), default='infer'
  )
  parser.add_argument('--official', default='', help='DI-MaskDINO checkout (--task official-*)')
  parser.add_argument('--detectron2', default='', help='detectron2 checkout (--task official-*)')
  parser.add_argument('--runs', type=int, default=3, help='timed runs (--task official-infer)')
  parser.add_argument('--canvas', type=int, nargs=2, default=(800, 1216))
  parser.add_argument('--depth', type=int, default=3, help='model path components per stage')
  parser.add_argument('--config', default='configs/shapes.py', help='config file (--task demo-train)')
  parser.add_argument(
    '--warmup',
    type=int,
    default=1,
    help='untraced calls before the traced one (under the malloc tunables the heap grows over the first 2-3 '
    'training steps, which run slower: take 3 for a steady-state training step)',
  )
  parser.add_argument('--json', default='')
  opts = parser.parse_args(argv)
  if opts.task in ('official-infer', 'official-train'):
    if opts.task == 'official-infer':
      result = {'stages_ms': official_infer_stages(opts.official, opts.detectron2, opts.runs)}
    else:
      result = official_train_ops(opts.official, opts.detectron2)
    if opts.json:
      with open(opts.json, 'w') as f:
        json.dump({'task': opts.task, **result}, f, indent=1)
    return

  if opts.task == 'infer':
    fn, args = infer_call(opts.canvas)
  elif opts.task == 'train':
    fn, args = train_call()
  else:
    fn, *args = demo_train_call(opts.config)
  lowered = fn.lower(*args)
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  paths = op_paths(compiled.as_text())
  call = compiled
  if opts.task in ('train', 'demo-train'):  # the step donates its state: keep feeding it the new one
    state, batch = args

    def call(s, b):
      nonlocal state
      state, metrics = compiled(state, b)
      return metrics

    args = (state, batch)
  t0 = time.perf_counter()
  for _ in range(max(1, opts.warmup)):
    jax.block_until_ready(call(*args))
  warm_s = time.perf_counter() - t0  # all the warm-up calls
  with tempfile.TemporaryDirectory() as out_dir:
    t0 = time.perf_counter()
    op_times = trace_op_times(call, args, out_dir)
    traced_s = time.perf_counter() - t0
  stages = collections.defaultdict(float)
  for op, (ms, _) in op_times.items():
    stages[stage_of(paths.get(op, op), opts.depth)] += ms
  total = sum(stages.values())
  print(
    f'{opts.task}: compile {compile_s:.1f} s, warm-up call {warm_s:.2f} s, traced call {traced_s:.2f} s wall; '
    f'op time {total / 1e3:.2f} s (summed over threads)'
  )
  print('| stage | ms | share |\n|---|---|---|')
  for name, ms in sorted(stages.items(), key=lambda kv: -kv[1]):
    if ms >= 0.005 * total:
      print(f'| {name} | {ms:.0f} | {100 * ms / total:.1f} % |')
  print('\nmost expensive ops:')
  for op, (ms, count) in sorted(op_times.items(), key=lambda kv: -kv[1][0])[:10]:
    print(f'  {ms:8.0f} ms {count:3d}x {op}: {paths.get(op, "?")[:140]}')
  if opts.json:
    with open(opts.json, 'w') as f:
      json.dump(
        {
          'task': opts.task,
          'compile_s': compile_s,
          'warm_s': warm_s,
          'traced_s': traced_s,
          'stages_ms': dict(stages),
          'ops_ms': {k: v[0] for k, v in op_times.items()},
          'op_paths': {k: paths.get(k, k) for k in op_times},
        },
        f,
        indent=1,
      )


if __name__ == '__main__':
  main()
