r"""The official DI-MaskDINO (PyTorch) against ours on the same machine: R50 inference and one training step.

  python benchmarks/vs_official.py --official /path/to/DI-MaskDINO --detectron2 /path/to/detectron2 \
      [--device cpu|cuda] [--skip-train] [--runs 5] [--threads N] [--json out.json]

Both sides get the same weights (the official R50 COCO model, 52,286,232 parameters, drawn from
tests/parity/fixture_io.FULL_SEED; ours through our converter) and the same inputs, and run one after the other,
each in its own subprocess (so that each side's peak resident memory is its own), with the same thread count
(torch.set_num_threads; XLA:CPU uses the process's cores). The official code is loaded as tests/parity/make_fixtures.py
loads it (no compiled deformable-attention op, so its MSDeformAttn takes its grid_sample fallback, the path it takes
on a CPU).

* inference: batch 1, scikit-image's `coffee` resized by the official test-time rule to 800 x 1200 (canvas
  800 x 1216): the official MaskDINO.forward in eval mode (post-processing to 100 detections with masks at
  800 x 1200 included) against our jitted predict + postprocess_batch (the same outputs); ms per image (median of
  --runs after one warm-up run; also the process CPU time per run, less sensitive to a shared machine's load than
  wall time), peak RSS of the process (weights and runtime included), ours' compile time apart.
* training step: batch 2, two 512 x 512 photographs (astronaut, a crop of coffee) with 3 and 5 box-shaped
  instances: official backbone + head in training mode with denoising (DN 'seg', 100 queries), its SetCriterion
  with HungarianMatcher (every loss, deep supervision), backward, full-model gradient clipping (L2 0.01) and AdamW
  (backbone lr x 0.1), float32 (the official AMP is a GPU feature); ours: our jitted train step of the same config
  (train.py's step: DN, host Hungarian matching, every loss, backward, clipping, AdamW). Median ms per step.

Prints a markdown table (with `uptime` before and after each side: the machine may be shared) and writes every
figure to --json. With --device cuda the torch model and inputs go to the GPU (still the grid_sample fallback) and
ours runs on JAX's default device; peak device memory is reported instead of RSS where available.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from dimaskdino_jax import runtime  # noqa: E402

runtime.configure(restart=__name__ == '__main__')  # XLA_FLAGS; malloc tunables (a restart) as a script

import numpy as np  # noqa: E402

TRAIN_HW = (512, 512)
TRAIN_INSTANCES = (3, 5)
INFER_PHOTO = 'coffee'


def uptime():
  try:
    with open('/proc/loadavg') as f:
      return ' '.join(f.read().split()[:3])
  except OSError:
    return 'n/a'


def peak_rss_mib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ------------------------------------------------------------------------------------------------ shared inputs
def infer_image():
  """(800, 1200, 3) uint8: the official test-time resize of skimage's coffee."""
  from tests.parity.fixture_io import photos

  images, _ = photos((INFER_PHOTO,), 800, 1333)
  return images[0]


def train_inputs():
  """Two 512 x 512 RGB photographs and box-shaped instances: images (2, H, W, 3) uint8, and per image labels (n,),
  boxes (n, 4) cxcywh normalized, masks (n, H, W) bool (rectangles aligned to 4 px, the GT mask stride)."""
  import skimage.data

  h, w = TRAIN_HW
  images = np.stack(
    [skimage.data.astronaut()[:h, :w], np.pad(skimage.data.coffee(), ((0, 112), (0, 0), (0, 0)))[:h, :w]]
  )
  rng = np.random.default_rng(0)
  targets = []
  for n in TRAIN_INSTANCES:
    y0 = rng.integers(0, h // 2, n) // 4 * 4
    x0 = rng.integers(0, w // 2, n) // 4 * 4
    hh = rng.integers(8, h // 2, n) // 4 * 4
    ww = rng.integers(8, w // 2, n) // 4 * 4
    masks = np.zeros((n, h, w), bool)
    for j in range(n):
      masks[j, y0[j] : y0[j] + hh[j], x0[j] : x0[j] + ww[j]] = True
    boxes = np.stack([(x0 + ww / 2) / w, (y0 + hh / 2) / h, ww / w, hh / h], -1).astype(np.float32)
    targets.append(dict(labels=rng.integers(0, 80, n).astype(np.int64), boxes=boxes, masks=masks))
  return images, targets


# ------------------------------------------------------------------------------------------------ official side
def official_criterion(SetCriterion, HungarianMatcher, p):
  """The criterion MaskDINO.from_config builds for the R50 COCO config (docs/architecture.md, "Losses":
  weights 4/5/5/5/2, 12544 points, oversample 3, importance 0.75, DN 'seg', deep supervision over the decoder and
  the TI layers)."""
  import tests.parity.make_fixtures as mf

  weights = mf.official_weight_dict(p['dec_layers'], p['ti_layers'])
  matcher = HungarianMatcher(
    cost_class=4.0, cost_mask=5.0, cost_dice=5.0, cost_box=5.0, cost_giou=2.0, num_points=12544
  )
  criterion = SetCriterion(
    p['num_classes'],
    matcher=matcher,
    weight_dict=weights,
    eos_coef=0.1,
    losses=['labels', 'masks', 'boxes'],
    num_points=12544,
    oversample_ratio=3.0,
    importance_sample_ratio=0.75,
    dn='seg',
    dn_losses=['labels', 'masks', 'boxes'],
    panoptic_on=False,
    semantic_ce_loss=False,
  )
  return criterion, weights


def official_model(args):
  import torch

  import tests.parity.make_fixtures as mf
  from tests.parity.fixture_io import FULL, FULL_SEED, draw_state_dict
  from tests.parity.make_full_fixtures import weight_entries

  torch.set_num_threads(args.threads)
  resnet, head, meta = mf.install_shims(os.path.abspath(args.official), os.path.abspath(args.detectron2))
  model = mf.build_official(resnet, head, meta, FULL)
  entries, aliases = weight_entries(model)
  sd = draw_state_dict(entries, aliases, FULL_SEED)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
  return model.to(args.device)


def _sync(device):
  if device == 'cuda':
    import torch

    torch.cuda.synchronize()


def worker_official_infer(args):
  import torch

  model = official_model(args).eval()
  img = infer_image()
  inputs = [{'image': torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().to(args.device)}]
  inputs[0].update(height=img.shape[0], width=img.shape[1])
  times, cpu = [], []
  with torch.no_grad():
    for _ in range(args.runs + 1):
      t0, c0 = time.perf_counter(), time.process_time()
      out = model(inputs)
      out[0]['instances'].pred_masks.sum().item()
      _sync(args.device)
      times.append(time.perf_counter() - t0)
      cpu.append(time.process_time() - c0)
  res = dict(ms=1e3 * float(np.median(times[1:])), runs_ms=[round(1e3 * t, 1) for t in times], first_s=times[0])
  res['cpu_ms'] = 1e3 * float(np.median(cpu[1:]))
  if args.device == 'cuda':
    res['peak_device_mib'] = torch.cuda.max_memory_allocated() / 2**20
  return res


def official_train_step(args):
  """A closure running one official training step (forward, SetCriterion, backward, clip, AdamW) on the training
  inputs: () -> (weighted loss, number of weighted loss terms)."""
  import torch

  from tests.parity.fixture_io import FULL

  model = official_model(args).train()
  import tests.parity.make_fixtures as mf

  # The official SetCriterion / HungarianMatcher with PointRend's point_features; `.to('cuda')` made a no-op.
  criterion_module, matcher_module = mf.install_training_shims(
    os.path.abspath(args.official), os.path.abspath(args.detectron2)
  )
  SetCriterion, HungarianMatcher = criterion_module.SetCriterion, matcher_module.HungarianMatcher
  criterion, weights = official_criterion(SetCriterion, HungarianMatcher, FULL)
  backbone = [p for n, p in model.named_parameters() if n.startswith('backbone.')]
  rest = [p for n, p in model.named_parameters() if not n.startswith('backbone.')]
  opt = torch.optim.AdamW([{'params': backbone, 'lr': 1e-5}, {'params': rest, 'lr': 1e-4}], lr=1e-4, weight_decay=0.05)
  images, targets = train_inputs()
  dev = args.device
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).float().to(dev)  # (B, 3, H, W)
  x = (x - model.pixel_mean) / model.pixel_std  # the official normalize; 512 is a multiple of 32: no padding
  tg = [
    {
      'labels': torch.from_numpy(t['labels']).to(dev),
      'boxes': torch.from_numpy(t['boxes']).to(dev),
      'masks': torch.from_numpy(t['masks']).to(dev),
    }
    for t in targets
  ]

  def step():
    features = model.backbone(x)
    outputs, mask_dict = model.sem_seg_head(features, targets=tg)
    terms = criterion(outputs, tg, mask_dict)
    loss = sum(terms[k] * weights[k] for k in terms if k in weights)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
    opt.step()
    return float(loss), len([k for k in terms if k in weights])

  return step


def worker_official_train(args):
  import torch

  step = official_train_step(args)
  dev = args.device
  times, losses, cpu = [], [], []
  for _ in range(args.runs + 1):
    t0, c0 = time.perf_counter(), time.process_time()
    loss, num_terms = step()
    losses.append(loss)
    _sync(dev)
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  res = dict(ms=1e3 * float(np.median(times[1:])), runs_ms=[round(1e3 * t, 1) for t in times], first_s=times[0])
  res['cpu_ms'] = 1e3 * float(np.median(cpu[1:]))
  res['loss_terms'] = num_terms
  res['losses'] = [round(v, 2) for v in losses]
  if dev == 'cuda':
    res['peak_device_mib'] = torch.cuda.max_memory_allocated() / 2**20
  return res


# ------------------------------------------------------------------------------------------------ our side
def our_config(train):
  from dimaskdino_jax.config import load_config

  c = load_config(os.path.join(REPO, 'configs', 'dimaskdino_r50_coco.py'))
  if train:
    c.data.image_size = TRAIN_HW[0]
    c.data.max_instances = max(TRAIN_INSTANCES)
    c.train.batch_size = len(TRAIN_INSTANCES)
  c.eval.batch_size = 1
  return c


def our_variables(config):
  from dimaskdino_jax.convert import convert_state_dict
  from tests.parity.fixture_io import FULL_SEED, draw_state_dict

  with open(os.path.join(REPO, 'tests', 'parity', 'fixtures_full', '256', 'weights.json')) as f:
    w = json.load(f)
  if w['seed'] != FULL_SEED:
    raise ValueError('tests/parity/fixtures_full/256/weights.json: seed differs from fixture_io.FULL_SEED')
  return convert_state_dict(draw_state_dict(w['entries'], w['aliases'], FULL_SEED), config, source='weights.json')


def _device_peak():
  import jax

  stats = jax.devices()[0].memory_stats() or {}
  return stats.get('peak_bytes_in_use', 0) / 2**20 or None


def worker_ours_infer(args):
  import jax

  from dimaskdino_jax.evaluation.inference import Predictor

  config = our_config(False)
  predictor = Predictor(config, our_variables(config), batch_size=1)
  img = infer_image()
  canvas = (800, 1216)
  times, cpu = [], []
  for _ in range(args.runs + 1):
    t0, c0 = time.perf_counter(), time.process_time()
    out = predictor.predict_batch([img], canvas)
    out[0]['masks'].sum()
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  res = dict(ms=1e3 * float(np.median(times[1:])), runs_ms=[round(1e3 * t, 1) for t in times])
  res['compile_s'] = times[0] - float(np.median(times[1:]))  # first call = compile + one run
  res['cpu_ms'] = 1e3 * float(np.median(cpu[1:]))
  res['backend'] = jax.default_backend()
  res['msda_impl'] = config.model.msda_impl
  if jax.default_backend() != 'cpu':
    res['peak_device_mib'] = _device_peak()
  return res


def our_train_step():
  """(jitted train step donating its state, state, batch): train.py's step of the R50 config on the training inputs."""
  import jax
  import jax.numpy as jnp

  from dimaskdino_jax.modeling.model import build_model
  from dimaskdino_jax.training import optimizer as optim_lib
  from dimaskdino_jax.training import partition
  from dimaskdino_jax.training.trainer import batch_to_device, make_train_step

  config = our_config(True)
  model = build_model(config)
  v = our_variables(config)
  tx = optim_lib.build_optimizer(config, partition.trainable_params(config, v['params']))
  state = {  # trainer.init_state's layout, with the converted weights instead of a fresh init
    'step': jnp.zeros((), jnp.int32),
    'params': v['params'],
    'frozen_bn': v['frozen_bn'],
    'opt_state': tx.init(partition.trainable_params(config, v['params'])),
    'rng': jax.random.key(0),
    'nonfinite': {'consecutive': jnp.zeros((), jnp.int32), 'total': jnp.zeros((), jnp.int32)},
  }
  images, targets = train_inputs()
  g, st = config.data.max_instances, config.data.mask_stride
  h, w = TRAIN_HW
  batch = dict(
    image=images,
    boxes=np.zeros((len(images), g, 4), np.float32),
    labels=np.zeros((len(images), g), np.int32),
    valid=np.zeros((len(images), g), bool),
    masks=np.zeros((len(images), g, h // st, w // st), np.uint8),
  )
  for b, t in enumerate(targets):
    n = len(t['labels'])
    batch['boxes'][b, :n], batch['labels'][b, :n], batch['valid'][b, :n] = t['boxes'], t['labels'], True
    batch['masks'][b, :n] = t['masks'][:, ::st, ::st]
  batch = batch_to_device(batch)
  return jax.jit(make_train_step(config, model, tx), donate_argnums=0), state, batch


def worker_ours_train(args):
  import jax

  jitted, state, batch = our_train_step()
  t0 = time.perf_counter()
  step = jitted.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  times, losses, cpu = [], [], []
  for _ in range(args.runs + 1):
    t0, c0 = time.perf_counter(), time.process_time()
    state, m = step(state, batch)
    losses.append(float(m['loss']))
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  res = dict(ms=1e3 * float(np.median(times[1:])), runs_ms=[round(1e3 * t, 1) for t in times], compile_s=compile_s)
  res['cpu_ms'] = 1e3 * float(np.median(cpu[1:]))
  res['losses'] = [round(v, 2) for v in losses]
  res['backend'] = jax.default_backend()
  if jax.default_backend() != 'cpu':
    res['peak_device_mib'] = _device_peak()
  return res


WORKERS = {
  'official_infer': worker_official_infer,
  'ours_infer': worker_ours_infer,
  'official_train': worker_official_train,
  'ours_train': worker_ours_train,
}


def run_worker(name, args):
  """One side in its own process: its result dict plus peak RSS and the load before and after."""
  cmd = [
    sys.executable,
    os.path.abspath(__file__),
    '--worker',
    name,
    '--official',
    args.official,
    '--detectron2',
    args.detectron2,
    '--device',
    args.device,
    '--runs',
    str(args.runs),
    '--threads',
    str(args.threads),
  ]
  before = uptime()
  t0 = time.time()
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('RESULT ')]
  if proc.returncode or not lines:
    sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
    raise SystemExit(f'{name} failed (exit {proc.returncode})')
  res = json.loads(lines[-1][len('RESULT ') :])
  res.update(load_before=before, load_after=uptime(), wall_s=round(time.time() - t0, 1))
  print(
    f'{name}: {res["ms"]:.0f} ms (runs {res["runs_ms"]}), peak RSS {res["peak_rss_mib"]:.0f} MiB, '
    f'load {before} -> {res["load_after"]}',
    flush=True,
  )
  return res


def versions():
  import jax
  import torch

  return {
    'jax': jax.__version__,
    'torch': torch.__version__,
    'numpy': np.__version__,
    'python': platform.python_version(),
  }


def table(r):
  rows = ['| task | official (PyTorch) | ours (JAX) | official / ours |', '|---|---|---|---|']
  for task, label in (
    ('infer', 'inference, batch 1, 800 x 1200 (ms / image)'),
    ('train', 'training step, batch 2, 512 x 512 (ms)'),
  ):
    if f'official_{task}' not in r:
      continue
    o, u = r[f'official_{task}'], r[f'ours_{task}']
    rows.append(f'| {label} | {o["ms"]:.0f} | {u["ms"]:.0f} | **{o["ms"] / u["ms"]:.2f}x** |')
    if 'cpu_ms' in o and 'cpu_ms' in u:  # process CPU time: much less sensitive to other processes than wall time
      rows.append(
        f'| {task}: process CPU time per run (ms) | {o["cpu_ms"]:.0f} | {u["cpu_ms"]:.0f} | '
        f'{o["cpu_ms"] / u["cpu_ms"]:.2f}x |'
      )
    rows.append(
      f'| {task}: peak RSS (MiB) | {o["peak_rss_mib"]:.0f} | {u["peak_rss_mib"]:.0f} | '
      f'{o["peak_rss_mib"] / u["peak_rss_mib"]:.2f}x |'
    )
    if 'peak_device_mib' in o and u.get('peak_device_mib'):
      rows.append(
        f'| {task}: peak device memory (MiB) | {o["peak_device_mib"]:.0f} | {u["peak_device_mib"]:.0f} | '
        f'{o["peak_device_mib"] / u["peak_device_mib"]:.2f}x |'
      )
    rows.append(f'| {task}: ours compile (s, apart) | | {u["compile_s"]:.0f} | |')
    rows.append(
      f'| {task}: load (1/5/15 min) before -> after | {o["load_before"]} -> {o["load_after"]} | '
      f'{u["load_before"]} -> {u["load_after"]} | |'
    )
  return '\n'.join(rows)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--official', required=True, help='DI-MaskDINO checkout (holds dimaskdino/)')
  parser.add_argument('--detectron2', required=True, help='detectron2 checkout (holds detectron2/)')
  parser.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
  parser.add_argument('--skip-train', action='store_true', help='inference only')
  parser.add_argument('--skip-infer', action='store_true', help='training step only')
  parser.add_argument('--runs', type=int, default=5, help='timed runs per side (after one warm-up run)')
  parser.add_argument('--threads', type=int, default=os.cpu_count(), help='torch threads (default: all cores)')
  parser.add_argument('--json', default=None, help='write every figure here')
  parser.add_argument('--worker', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    import warnings

    warnings.filterwarnings('ignore')
    res = WORKERS[args.worker](args)
    res['peak_rss_mib'] = peak_rss_mib()
    print('RESULT ' + json.dumps(res), flush=True)
    return
  results = {
    'machine': f'{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}',
    'date': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()),
    'device': args.device,
    'threads': args.threads,
    'runs': args.runs,
    'versions': versions(),
    'xla_flags': os.environ.get('XLA_FLAGS', ''),
    'malloc': runtime.describe_malloc(),  # both sides' workers inherit this process's environment
  }
  tasks = ([] if args.skip_infer else ['infer']) + ([] if args.skip_train else ['train'])
  for task in tasks:
    for side in ('official', 'ours'):
      results[f'{side}_{task}'] = run_worker(f'{side}_{task}', args)
      results[f'{task}_ratio'] = None
    results[f'{task}_ratio'] = results[f'official_{task}']['ms'] / results[f'ours_{task}']['ms']
  print()
  print(
    f'{results["machine"]}; {results["date"]}; device {args.device}; threads {args.threads}; {results["versions"]}; '
    f'malloc (both sides): {results["malloc"]}'
  )
  print(table(results))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=2)


if __name__ == '__main__':
  main()
