r"""The whole GPU check in one prepared run: kernels, the model's speed and memory, the official code beside it.

On the GPU machine (Python 3.12 with jax 0.11 + CUDA, flax, optax, orbax, torch installed; no network), from the
repository root, with the wheels of `make gpu-wheels` in .whl (and `make official-src` for check 5):

  python3 benchmarks/gpu_check.py OUT --wheels .whl \
      [--official .official/DI-MaskDINO --detectron2 .official/detectron2] [--only 1,2] [--budget inference=200] \
      [--total-budget 475]

On a CPU, the same run end to end at tiny sizes (tests/test_gpu_check.py runs it):

  python benchmarks/gpu_check.py OUT --cpu-smoke

It installs the wheels offline into a temporary folder put first on PYTHONPATH (pip --no-deps --target: the
machine's own jax, flax, numpy stay; skipped when the packages already import, `--install auto`), records the
environment (versions, devices, nvidia-smi), then runs the checks in this order, each part in its own process
with its own time limit, so that one slow part cannot eat the time of the others (a part that ends early leaves its
unused seconds to the next; no part runs past the total budget):

  1 pallas_tests  pytest tests/kernels -k pallas: the compiled Pallas forward and backward against the float64
                  oracle, float32 and bfloat16 (on a CPU: Pallas' interpret mode, one test subset).
  2 msda          benchmarks/msda.py at the encoder and decoder sizes: Pallas vs the XLA path vs PyTorch
                  grid_sample on the same device, forward and forward+backward, and the memory-traffic floor at
                  the measured copy bandwidth.
  3 inference     benchmarks/inference.py: the R50 model at 800 x 1344 (1333 x 800 images), batch 1 and 8,
                  float32 and bfloat16 backbone, random weights: images/s, compile seconds, peak device memory;
                  beside the paper's FPS (DI-MaskDINO 7.7, MaskDINO 8.0, R50, RTX 3090).
  4 train_step    benchmarks/train_step.py: the R50 train step (denoising, matching, losses, backward, AdamW) at
                  1024 x 1024 (the LSJ canvas; random images and boxes), batch 2 and 8, remat on and off:
                  images/s, peak device memory per image.
  5 official      benchmarks/vs_official.py --official P --detectron2 P --device cuda --skip-train --json F: the
                  official DI-MaskDINO on the same GPU (skipped, with the reason, when the paths are not given or
                  the script is absent).

OUT gets gpu_check.json (rewritten after every part, so a run cut short keeps what it measured) and gpu_check.log
(every child's output). The goals are computed into the JSON's `goals`: Pallas >= 2x the XLA path on the encoder's
forward+backward; R50 inference in bf16 at batch 1 >= 2x the paper's 7.7 FPS; training peak memory <= 12 GiB per
image with remat. In --cpu-smoke mode the sizes are tiny and the goals' `meaningful` is false.

Helpers (stdlib only, like the rest of this file: it runs before the wheels are installed):

  python benchmarks/gpu_check.py --download-wheels .whl          # `make gpu-wheels`: the missing wheels, size check
  python benchmarks/gpu_check.py --prepare-official SRC_DIMASKDINO SRC_DETECTRON2 [--dest .official]
                                                                 # `make official-src`: their sources, for check 5
"""

import argparse
import datetime
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The project's dependencies that the GPU machine lacks (pyproject.toml pins for the direct ones; the shared venv's
# versions for the rest), as Python 3.12 manylinux x86-64 wheels. Present there and not carried: jax, jaxlib (0.11.2
# + the CUDA 13 plugin), flax, optax, orbax-checkpoint, chex, numpy (2.5.2, not the pin 2.4.6), scipy, pillow, tqdm,
# matplotlib, flatbuffers, absl-py, etils, protobuf, psutil, pyarrow, requests, wrapt, attrs, cloudpickle, pyyaml,
# typing-extensions, torch, pytest.
GPU_WHEELS = (
  'tensorflow-datasets==4.9.10',
  'grain==0.2.18',
  'pycocotools==2.0.11',
  'clu==0.0.12',
  'ml-collections==1.1.0',
  'tensorboardX==2.6.5',
  # needed by the above, missing there
  'array-record==0.8.6',
  'portpicker==1.6.0',
  'dm-tree==0.1.10',
  'immutabledict==4.3.1',
  'simple-parsing==0.1.9',
  'docstring-parser==0.18.0',
  'tensorflow-metadata==1.21.0',
  'googleapis-common-protos==1.76.0',
  'termcolor==3.3.0',
  'toml==0.10.2',
)
# Published as source only (pure Python): built into a py3-none-any wheel here.
GPU_SDISTS = ('promise==2.3',)
WHEELS_MAX_MIB = 50
# Importing these proves the wheels are in place (or were already installed).
WHEEL_MODULES = ('tensorflow_datasets', 'grain', 'pycocotools', 'clu', 'ml_collections', 'tensorboardX', 'promise')
PIP_PLATFORMS = (
  'manylinux_2_28_x86_64',
  'manylinux_2_27_x86_64',
  'manylinux_2_24_x86_64',
  'manylinux_2_17_x86_64',
  'manylinux2014_x86_64',
  'manylinux1_x86_64',
)

# Versions to record (distribution names).
DISTS = (
  'jax',
  'jaxlib',
  'jax-cuda13-plugin',
  'jax-cuda13-pjrt',
  'jax-cuda12-plugin',
  'flax',
  'optax',
  'orbax-checkpoint',
  'chex',
  'numpy',
  'scipy',
  'ml-dtypes',
  'torch',
  'torchvision',
  'triton',
  'pillow',
  'tqdm',
  'matplotlib',
  'protobuf',
  'etils',
  'absl-py',
  'pytest',
  *(w.split('==')[0] for w in GPU_WHEELS + GPU_SDISTS),
)

PAPER_FPS = {'DI-MaskDINO': 7.7, 'MaskDINO': 8.0}  # R50, RTX 3090, as the paper reports them (issue 19)
GOALS = {'pallas_vs_xla': 2.0, 'fps_vs_paper': 2.0, 'train_gib_per_image': 12.0}
GIB = 2**30

R50 = 'configs/dimaskdino_r50_coco.py'
# The smoke model: configs/shapes.py shrunk like tests/tiny.py, then further (fewer layers and loss terms) so that
# the train step compiles in about a minute on a CPU.
TINY = (
  '--config.model.hidden_dim=32',
  '--config.model.encoder.num_groups=16',
  '--config.model.encoder.ffn_dim=64',
  '--config.model.decoder.ffn_dim=64',
  '--config.model.di.selection_ks=(24,12)',
  '--config.model.decoder.num_queries=12',
  '--config.model.bato.num_guiding_tokens=4',
  '--config.model.dn.num=10',
  '--config.loss.num_points=64',
  '--config.matcher.num_points=64',
  '--config.data.image_size=64',
  '--config.data.max_instances=4',
  '--config.eval.detections_per_image=12',
)
TINY_TRAIN = (
  '--config.model.encoder.num_layers=1',
  '--config.model.decoder.num_layers=2',
  '--config.model.di.ti_layers=1',
  '--config.loss.deep_supervision=False',
  '--config.loss.di_aux_losses=False',
  '--config.loss.interm_losses=False',
  '--config.model.dn.mode=none',
)

CHECKS = ('pallas_tests', 'msda', 'inference', 'train_step', 'official')
# The model parts run with model.msda_impl 'auto' (the Pallas kernels on GPUs); a part that fails (not one that runs
# out of time) is run again at once with the XLA path, within what is left of its limit, so that a kernel that does
# not compile there still leaves the model's figures (recorded as the part's `fallback`).
XLA_PATH = '--config.model.msda_impl=xla'


# ----------------------------------------------------------------------------------------------------------------
# The plan: every check's parts (one process each), budgets in seconds.


def plan(smoke: bool, official: str | None, detectron2: str | None, tmp: str) -> list[dict]:
  """The checks in order, each {'id', 'name', 'parts': [{'name', 'cmd', 'budget_s', 'json'?, 'junit'?, ...}]}
  or {'skip': reason}."""
  py = sys.executable
  checks = []

  # 1: the Pallas kernel tests (compiled on a GPU; interpret mode on a CPU: one subset, the kernels' own check).
  junit = os.path.join(tmp, 'pallas_tests.xml')
  if smoke:
    select = ['tests/kernels/test_ms_deform_attn.py', '-k', 'pallas and (bfloat16 or single_pixel)']
  else:
    select = ['tests/kernels', '-k', 'pallas']
  cmd = [py, '-m', 'pytest', *select, '-q', '-p', 'no:cacheprovider', '-o', 'addopts=', f'--junitxml={junit}']
  checks.append({'name': 'pallas_tests', 'parts': [{'name': 'pytest', 'cmd': cmd, 'budget_s': 60, 'junit': junit}]})

  # 2: deformable attention, Pallas vs XLA vs torch.
  js = os.path.join(tmp, 'msda.json')
  if smoke:
    args = ['--sizes', 'shapes', '--repeats', '2', '--impls', 'xla,pallas,torch', '--torch-device', 'cpu']
  else:
    args = ['--sizes', 'encoder,decoder', '--repeats', '20', '--impls', 'xla,pallas,torch', '--torch-device', 'cuda']
  cmd = [py, 'benchmarks/msda.py', '--json', js, *args]
  checks.append({'name': 'msda', 'parts': [{'name': 'msda', 'cmd': cmd, 'budget_s': 60, 'json': js}]})

  # 3: R50 inference (tiny model on a CPU); the goal's variant first.
  parts = []
  if smoke:
    variants = [(1, 'bfloat16', 2), (2, 'float32', 2)]
    base = ['--config', 'configs/shapes.py', '--canvas', '64', '64', *TINY, '--fast-compile']
  else:
    variants = [(1, 'bfloat16', 20), (1, 'float32', 20), (8, 'bfloat16', 8), (8, 'float32', 8)]
    base = ['--config', R50, '--canvas', '800', '1344']
  for bsz, dtype, steps in variants:
    js = os.path.join(tmp, f'inference_b{bsz}_{dtype}.json')
    cmd = [py, 'benchmarks/inference.py', *base, '--batch-size', str(bsz), '--dtype', dtype, '--steps', str(steps)]
    parts.append(
      {
        'name': f'b{bsz}_{dtype}',
        'cmd': [*cmd, '--json', js],
        'fallback': [*cmd, '--json', js, XLA_PATH],
        'budget_s': 60 if smoke else (40 if bsz == 1 and dtype == 'bfloat16' else 30),
        'json': js,
        'batch_size': bsz,
        'dtype': dtype,
      }
    )
  checks.append({'name': 'inference', 'parts': parts})

  # 4: the train step; the goal's variant (remat) first.
  parts = []
  if smoke:
    variants = [(2, True, 2)]
    base = ['--config', 'configs/shapes.py', *TINY, *TINY_TRAIN, '--fast_compile']
  else:
    variants = [(2, True, 5), (8, True, 3), (2, False, 5), (8, False, 3)]
    base = ['--config', R50]
  for bsz, remat, steps in variants:
    name = f'b{bsz}_remat_{"on" if remat else "off"}'
    js = os.path.join(tmp, f'train_step_{name}.json')
    cmd = [py, 'benchmarks/train_step.py', *base, '--batch_size', str(bsz), '--steps', str(steps)]
    cmd += [f'--config.model.remat={remat}', '--json', js]
    fallback = [*cmd, XLA_PATH]
    budget = 180 if smoke else (50 if bsz == 2 and remat else 30)
    parts.append(
      {
        'name': name,
        'cmd': cmd,
        'fallback': fallback,
        'budget_s': budget,
        'json': js,
        'batch_size': bsz,
        'remat': remat,
      }
    )
  checks.append({'name': 'train_step', 'parts': parts})

  # 5: the official code on the same device.
  script = os.path.join(ROOT, 'benchmarks', 'vs_official.py')
  if not (official and detectron2):
    checks.append({'name': 'official', 'skip': 'no --official / --detectron2 paths given'})
  elif not os.path.isfile(script):
    checks.append({'name': 'official', 'skip': 'benchmarks/vs_official.py is not in this tree'})
  else:
    missing = [p for p in (official, detectron2) if not os.path.isdir(p)]
    if missing:
      checks.append({'name': 'official', 'skip': f'not a directory: {", ".join(missing)}'})
    else:
      js = os.path.join(tmp, 'official.json')
      cmd = [py, 'benchmarks/vs_official.py', '--official', official, '--detectron2', detectron2]
      cmd += ['--device', 'cpu' if smoke else 'cuda', '--skip-train', '--json', js]
      checks.append({'name': 'official', 'parts': [{'name': 'vs_official', 'cmd': cmd, 'budget_s': 60, 'json': js}]})

  for i, c in enumerate(checks, 1):
    c['id'] = i
  return checks


# ----------------------------------------------------------------------------------------------------------------
# Running children with limits.


def run_child(cmd, timeout_s: float, log, env=None, cwd=ROOT, tail_lines: int = 30) -> dict:
  """Runs `cmd` in its own process group, its output appended to `log` (a text file object); kills the whole group
  (SIGKILL) at `timeout_s`. Returns {'status': 'ok' | 'failed' | 'timeout', 'rc', 'wall_s', 'tail'}."""
  log.write(f'$ {" ".join(cmd)}\n')
  log.flush()
  t0 = time.monotonic()
  with tempfile.TemporaryFile('w+') as out:
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)
    try:
      rc = proc.wait(timeout=max(timeout_s, 0.1))
      status = 'ok' if rc == 0 else 'failed'
    except subprocess.TimeoutExpired:
      try:
        os.killpg(proc.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      rc = proc.wait()
      status = 'timeout'
    wall = time.monotonic() - t0
    out.seek(0)
    text = out.read()
  log.write(text)
  log.write(f'[{status}: rc {rc}, {wall:.1f} s of {timeout_s:.0f} s]\n\n')
  log.flush()
  return {'status': status, 'rc': rc, 'wall_s': round(wall, 2), 'tail': text.splitlines()[-tail_lines:]}


def parse_junit(path: str) -> dict:
  """Counts and failed test names of a pytest --junitxml file."""
  root = ET.parse(path).getroot()
  suites = [root] if root.tag == 'testsuite' else list(root.iter('testsuite'))
  counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ('tests', 'failures', 'errors', 'skipped')}
  failed, skipped = [], []
  for case in root.iter('testcase'):
    name = f'{case.get("classname", "")}::{case.get("name", "")}'
    for tag in ('failure', 'error'):
      el = case.find(tag)
      if el is not None:
        failed.append({'test': name, 'message': (el.get('message') or '')[:300]})
    el = case.find('skipped')
    if el is not None:
      skipped.append({'test': name, 'message': (el.get('message') or '')[:200]})
  counts['passed'] = counts['tests'] - counts['failures'] - counts['errors'] - counts['skipped']
  return {**counts, 'failed': failed, 'skipped_tests': skipped}


def _load_json(path):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


# ----------------------------------------------------------------------------------------------------------------
# Figures and goals from the parts' results.


def summarize(check: dict) -> dict:
  """The check's figures from its parts' results (for the JSON and the closing table)."""
  name, parts = check['name'], check.get('parts', [])
  ok = [p for p in parts if p.get('result') is not None]
  if name == 'pallas_tests':
    return dict(parts[0]['result']) if ok else {}
  if name == 'msda':
    if not ok:
      return {}
    r = parts[0]['result']
    bw = r.get('bandwidth', {})
    figures = {'bandwidth_gbs': bw.get('gbs'), 'bandwidth_source': bw.get('source')}
    for size, by_impl in r.items():
      if size == 'bandwidth':
        continue
      figures[size] = by_impl
      xla, pallas, torch = (by_impl.get(k) for k in ('xla', 'pallas', 'torch'))
      xla, pallas, torch = (None if r is None or 'error' in r else r for r in (xla, pallas, torch))
      for key in ('fwd_ms', 'fwdbwd_ms'):
        if xla and pallas:
          figures[size][f'pallas_speedup_vs_xla_{key[:-3]}'] = round(xla[key] / pallas[key], 3)
        if torch and pallas:
          figures[size][f'pallas_speedup_vs_torch_{key[:-3]}'] = round(torch[key] / pallas[key], 3)
        if torch and xla:
          figures[size][f'xla_speedup_vs_torch_{key[:-3]}'] = round(torch[key] / xla[key], 3)
    return figures
  if name == 'inference':
    rows = {}
    for p in ok:
      r = dict(p['result'])
      r['vs_paper'] = {k: round(r['images_per_s'] / v, 3) for k, v in PAPER_FPS.items()}
      rows[p['name']] = r
    return {'paper_fps': PAPER_FPS, 'variants': rows}
  if name == 'train_step':
    rows = {}
    for p in ok:
      r = dict(p['result'])
      peak = r.get('device_peak_bytes_per_image')
      source = 'device peak_bytes_in_use'
      if peak is None:
        peak, source = r.get('xla_peak_bytes_per_image'), "XLA's memory analysis (no device statistics)"
      r['peak_gib_per_image'] = None if peak is None else round(peak / GIB, 6)
      r['peak_source'] = source
      rows[p['name']] = r
    return {'variants': rows}
  if name == 'official':
    return {'result': parts[0]['result']} if ok else {}
  return {}


def _find_number(tree, pattern: str):
  """The first number under a key matching `pattern` (regex) in a nested JSON value, depth first."""
  if isinstance(tree, dict):
    for k, v in tree.items():
      if re.search(pattern, str(k)) and isinstance(v, int | float) and not isinstance(v, bool):
        return float(v)
    for v in tree.values():
      found = _find_number(v, pattern)
      if found is not None:
        return found
  if isinstance(tree, list):
    for v in tree:
      found = _find_number(v, pattern)
      if found is not None:
        return found
  return None


def goals(checks: list[dict], smoke: bool) -> dict:
  """Pass / fail of the three goals from the measurements (None where the measurement is missing)."""
  by_name = {c['name']: c.get('figures', {}) for c in checks}
  out = {}

  enc = by_name.get('msda', {}).get('encoder', {})
  ratio = enc.get('pallas_speedup_vs_xla_fwdbwd')
  out['pallas_2x_xla_encoder_fwdbwd'] = {
    'target': f'XLA path ms / Pallas ms >= {GOALS["pallas_vs_xla"]} (encoder size, forward+backward)',
    'value': ratio,
    'pass': None if ratio is None else ratio >= GOALS['pallas_vs_xla'],
    **({} if ratio is not None else {'why_none': 'no encoder-size Pallas and XLA figures (Pallas runs on GPUs only)'}),
  }

  variants = by_name.get('inference', {}).get('variants', {})
  b1 = variants.get('b1_bfloat16')
  fps = None if b1 is None else b1['images_per_s']
  need = GOALS['fps_vs_paper'] * PAPER_FPS['DI-MaskDINO']
  # benchmarks/vs_official.py: official_infer.ms (ms per image, batch 1, post-processing included) and infer_ratio
  # (official ms / ours ms on the same inputs); another layout: the first images_per_s / fps figure in it.
  off = by_name.get('official', {}).get('result') or {}
  official_ms = (off.get('official_infer') or {}).get('ms') if isinstance(off, dict) else None
  official_fps = 1000.0 / official_ms if official_ms else _find_number(off, r'images_per_s|fps')
  out['r50_bf16_2x_paper_fps'] = {
    'target': f'R50 inference, bfloat16 backbone, batch 1: >= {need:.1f} images/s ({GOALS["fps_vs_paper"]}x the '
    f"paper's {PAPER_FPS['DI-MaskDINO']} FPS)",
    'value': fps,
    'pass': None if fps is None else fps >= need,
    'ratio_to_paper': None if fps is None else round(fps / PAPER_FPS['DI-MaskDINO'], 3),
    'official_images_per_s_same_device': official_fps,
    'ratio_to_official_same_device': None if fps is None or not official_fps else round(fps / official_fps, 3),
    'vs_official_infer_ratio': off.get('infer_ratio') if isinstance(off, dict) else None,
  }

  train = by_name.get('train_step', {}).get('variants', {})
  remat = {k: v['peak_gib_per_image'] for k, v in train.items() if v.get('remat')}
  remat = {k: v for k, v in remat.items() if v is not None}
  worst = max(remat.values()) if remat else None
  out['train_remat_le_12gib_per_image'] = {
    'target': f'train step with remat: peak device memory / batch <= {GOALS["train_gib_per_image"]} GiB',
    'value': worst,
    'per_variant': remat,
    'pass': None if worst is None else worst <= GOALS['train_gib_per_image'],
  }
  for g in out.values():
    g['meaningful'] = not smoke
  return out


# ----------------------------------------------------------------------------------------------------------------
# Setup: wheels and the environment.


def _wheel_name(path: str) -> str:
  return os.path.basename(path).split('-')[0].lower().replace('_', '-')


def check_wheels(folder: str, max_mib: float = WHEELS_MAX_MIB) -> dict:
  """Sizes of the wheels in `folder`; raises ValueError if over `max_mib`, two versions of one package, or none."""
  wheels = sorted(glob.glob(os.path.join(folder, '*.whl')))
  if not wheels:
    raise ValueError(f'{folder}: no wheels (run `make gpu-wheels`)')
  names = [_wheel_name(w) for w in wheels]
  twice = sorted({n for n in names if names.count(n) > 1})
  if twice:
    raise ValueError(f'{folder}: more than one wheel of {", ".join(twice)} (keep one version of each)')
  total = sum(os.path.getsize(w) for w in wheels)
  if total > max_mib * 2**20:
    raise ValueError(f'{folder}: the wheels take {total / 2**20:.1f} MiB, more than the {max_mib} MiB allowed')
  files = [os.path.basename(w) for w in wheels]
  return {'folder': folder, 'count': len(wheels), 'mib': round(total / 2**20, 2), 'files': files}


def download_wheels(folder: str) -> dict:
  """`make gpu-wheels`: the GPU_WHEELS for CPython 3.12 manylinux x86-64 (no dependencies), GPU_SDISTS built here
  into pure-Python wheels; wheels of other versions or packages in `folder` are removed; then the size check."""
  os.makedirs(folder, exist_ok=True)
  pip = [sys.executable, '-m', 'pip']
  cmd = [*pip, 'download', '--no-deps', '--only-binary=:all:', '--python-version', '3.12', '--implementation', 'cp']
  for p in PIP_PLATFORMS:
    cmd += ['--platform', p]
  subprocess.run([*cmd, '-d', folder, *GPU_WHEELS], check=True)
  subprocess.run([*pip, 'wheel', '--no-deps', '-w', folder, *GPU_SDISTS], check=True)
  wanted = {(n.split('==')[0].lower().replace('_', '-'), n.split('==')[1]) for n in GPU_WHEELS + GPU_SDISTS}
  for w in glob.glob(os.path.join(folder, '*.whl')):
    version = os.path.basename(w).split('-')[1]
    if (_wheel_name(w), version) not in wanted:
      print(f'removing {w} (not in GPU_WHEELS / GPU_SDISTS)')
      os.remove(w)
  info = check_wheels(folder)
  print(f'{folder}: {info["count"]} wheels, {info["mib"]} MiB (limit {WHEELS_MAX_MIB} MiB)')
  return info


OFFICIAL_SUFFIXES = ('.py', '.yaml', '.cu', '.cuh', '.cpp', '.h')


def prepare_official(dimaskdino: str, detectron2: str, dest: str) -> dict:
  """`make official-src`: the source files (.py, the configs' .yaml, the deformable-attention op's .cu/.cpp/.h) of
  the two checkouts into dest/DI-MaskDINO and dest/detectron2 (ignored by git, carried to the GPU machine); of
  detectron2 only its `detectron2` package folder."""
  out = {}
  # detectron2: its package folder only (not its tools, tests, projects); the checkout's layout is kept.
  for src, name, sub in ((dimaskdino, 'DI-MaskDINO', ''), (detectron2, 'detectron2', 'detectron2')):
    if not os.path.isdir(os.path.join(src, sub)):
      raise ValueError(f'{os.path.join(src, sub)}: not a directory (the {name} checkout)')
    target = os.path.join(dest, name)
    shutil.rmtree(target, ignore_errors=True)
    count = size = 0
    for dirpath, dirnames, filenames in os.walk(os.path.join(src, sub)):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith('.') and d != '__pycache__')
      for f in sorted(filenames):
        if f.endswith(OFFICIAL_SUFFIXES):
          rel = os.path.relpath(os.path.join(dirpath, f), src)
          os.makedirs(os.path.dirname(os.path.join(target, rel)), exist_ok=True)
          shutil.copy2(os.path.join(dirpath, f), os.path.join(target, rel))
          count += 1
          size += os.path.getsize(os.path.join(dirpath, f))
    out[name] = {'path': target, 'files': count, 'mib': round(size / 2**20, 2)}
    print(f'{src} -> {target}: {count} files, {size / 2**20:.1f} MiB')
  return out


ENV_SCRIPT = r"""
import importlib, importlib.metadata as md, json, platform, sys
out = {'python': sys.version.split()[0], 'executable': sys.executable, 'platform': platform.platform()}
out['versions'] = {}
for d in DISTS:
  try:
    out['versions'][d] = md.version(d)
  except md.PackageNotFoundError:
    out['versions'][d] = None
import jax
out['jax_backend'] = jax.default_backend()
out['devices'] = [f'{d.platform}:{d.device_kind}' for d in jax.devices()]
out['imports'] = {}
for m in MODULES:
  try:
    importlib.import_module(m)
    out['imports'][m] = 'ok'
  except Exception as e:
    out['imports'][m] = f'{type(e).__name__}: {e}'
print('GPU_CHECK_ENV ' + json.dumps(out))
"""
PROJECT_MODULES = (
  'kernels.ms_deform_attn.pallas',
  'dimaskdino_jax.modeling.model',
  'dimaskdino_jax.training.trainer',
  'dimaskdino_jax.evaluation.evaluator',
  'dimaskdino_jax.export',
  'dimaskdino_jax.data.prepare',
)


def environment(env, log, timeout_s: float) -> dict:
  code = ENV_SCRIPT.replace('DISTS', repr(DISTS)).replace('MODULES', repr(PROJECT_MODULES + WHEEL_MODULES))
  r = run_child([sys.executable, '-c', code], timeout_s, log, env=env)
  info = {'status': r['status'], 'wall_s': r['wall_s']}
  for line in r['tail']:
    if line.startswith('GPU_CHECK_ENV '):
      info.update(json.loads(line[len('GPU_CHECK_ENV ') :]))
  if 'imports' in info:
    bad = {m: e for m, e in info['imports'].items() if e != 'ok'}
    if bad:
      info['status'] = 'failed'
      info['import_errors'] = bad
  else:
    info['tail'] = r['tail']
  try:
    q = 'name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu'
    smi = subprocess.run(['nvidia-smi', f'--query-gpu={q}', '--format=csv'], capture_output=True, text=True, timeout=20)
    info['nvidia_smi'] = smi.stdout.strip().splitlines()
  except (OSError, subprocess.SubprocessError) as e:
    info['nvidia_smi'] = f'unavailable: {type(e).__name__}'
  info['cpu_count'] = os.cpu_count()
  try:
    info['loadavg'] = [round(x, 2) for x in os.getloadavg()]
  except OSError:
    pass
  return info


def install_wheels(folder: str | None, mode: str, site: str, env: dict, log) -> dict:
  """Installs the wheels of `folder` into `site` (pip --no-index --no-deps --target) unless mode is 'never' or
  (mode 'auto') every module of WHEEL_MODULES already imports; returns what happened."""
  probe = [sys.executable, '-c', 'import ' + ', '.join(WHEEL_MODULES)]
  if mode == 'never':
    return {'status': 'skipped', 'reason': '--install never'}
  if mode == 'auto' and run_child(probe, 120, log, env=env)['status'] == 'ok':
    return {'status': 'skipped', 'reason': 'the packages already import'}
  if not folder:
    return {'status': 'failed', 'reason': 'packages missing and no --wheels folder given (run `make gpu-wheels`)'}
  try:
    info = check_wheels(folder)
  except ValueError as e:
    return {'status': 'failed', 'reason': str(e)}
  cmd = [sys.executable, '-m', 'pip', 'install', '-q', '--no-index', '--no-deps', '--no-compile', '--no-cache-dir']
  cmd += ['--upgrade', '--target', site, *sorted(glob.glob(os.path.join(folder, '*.whl')))]
  r = run_child(cmd, 180, log, env=env)
  out = {'status': r['status'], 'wall_s': r['wall_s'], 'site': site, 'wheels': info}
  if r['status'] != 'ok':
    out['tail'] = r['tail']
  return out


# ----------------------------------------------------------------------------------------------------------------


def run_part(p: dict, timeout: float, log, env) -> dict:
  """Runs part `p` ({'cmd', 'json' or 'junit', 'fallback'?}) within `timeout` seconds; returns {'status', 'rc',
  'wall_s', 'result', 'tail'?, 'fallback'?}. A failed part with a `fallback` command runs it at once within the rest
  of `timeout`; its result then stands for the part's (status 'ok' and `fallback` = what the first run said)."""
  r = run_child(p['cmd'], timeout, log, env=env)
  out = {'status': r['status'], 'rc': r['rc'], 'wall_s': r['wall_s']}
  if 'junit' in p and os.path.isfile(p['junit']):
    out['result'] = parse_junit(p['junit'])
    if out['result']['failures'] or out['result']['errors']:
      out['status'] = 'failed'
  elif 'json' in p:
    out['result'] = _load_json(p['json']) if r['status'] == 'ok' else None
  if out['status'] != 'ok' or out.get('result') is None:
    out['tail'] = r['tail']
  left = timeout - r['wall_s']
  if out['status'] == 'failed' and p.get('fallback') and left >= 5:
    log.write(f'[failed: running the fallback within {left:.0f} s]\n')
    f = run_child(p['fallback'], left, log, env=env)
    first = {k: out[k] for k in ('status', 'rc', 'wall_s', 'tail') if k in out}
    out = {'status': f['status'], 'rc': f['rc'], 'wall_s': round(r['wall_s'] + f['wall_s'], 2)}
    out['result'] = _load_json(p['json']) if f['status'] == 'ok' and 'json' in p else None
    out['fallback'] = {'command': ' '.join(p['fallback']), 'first_run': first}
    if f['status'] != 'ok':
      out['tail'] = f['tail']
  return out


def _status(parts: list[dict]) -> str:
  states = [p['status'] for p in parts]
  if all(s == 'ok' for s in states):
    return 'ok'
  if any(s == 'ok' for s in states):
    return 'partial'
  return 'timeout' if 'timeout' in states else 'failed'


def table(report: dict) -> str:
  """A short text summary (the device tool returns the end of the output)."""
  lines = [f'gpu_check ({report["mode"]}): {report.get("wall_s", 0):.0f} s of {report["total_budget_s"]} s']
  env = report['setup'].get('environment', {})
  lines.append(f'  devices {env.get("devices")}; jax {env.get("versions", {}).get("jax")}')
  for c in report['checks']:
    line = f'  {c["id"]} {c["name"]:13s} {c["status"]:8s}'
    if c.get('reason'):
      line += f' ({c["reason"]})'
    for p in c.get('parts', []):
      line += f' | {p["name"]} {p["status"]} {p.get("wall_s", 0):.0f}/{p.get("timeout_s", 0):.0f}s'
      line += ' (after a failure, with the XLA path)' if 'fallback' in p else ''
    lines.append(line)
    f = c.get('figures', {})
    if c['name'] == 'pallas_tests' and f:
      lines.append(f'      passed {f["passed"]} failed {f["failures"] + f["errors"]} skipped {f["skipped"]}')
    if c['name'] == 'msda':
      for size in ('encoder', 'decoder', 'shapes'):
        if size in f:
          cells = ', '.join(
            f'{k} failed' if 'error' in v else f'{k} {v["fwd_ms"]:.2f}/{v["fwdbwd_ms"]:.2f}'
            for k, v in f[size].items()
            if isinstance(v, dict) and k in ('xla', 'pallas', 'torch', 'dense', 'reference', 'floor')
          )
          lines.append(f'      {size} fwd/fwd+bwd ms: {cells}')
    for name, r in f.get('variants', {}).items():
      mem = r.get('device_peak_bytes') or r.get('xla_peak_bytes')
      extra = f', {r["peak_gib_per_image"]} GiB/image' if 'peak_gib_per_image' in r else ''
      lines.append(
        f'      {name}: {r["images_per_s"]:.2f} images/s, compile {r["compile_s"]:.0f} s, peak '
        f'{(mem or 0) / GIB:.2f} GiB{extra}'
      )
  for k, g in report.get('goals', {}).items():
    note = '' if g['meaningful'] else ' (smoke: not meaningful)'
    lines.append(f'  goal {k}: value {g["value"]} pass {g["pass"]}{note}')
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('out', nargs='?', help='folder for gpu_check.json and gpu_check.log')
  parser.add_argument('--cpu-smoke', action='store_true', help='tiny sizes on this CPU (tests/test_gpu_check.py)')
  parser.add_argument('--wheels', help='folder of the wheels to install (make gpu-wheels)')
  parser.add_argument('--install', default='auto', choices=('auto', 'always', 'never'))
  parser.add_argument('--official', help='the official DI-MaskDINO sources (make official-src: .official/DI-MaskDINO)')
  parser.add_argument('--detectron2', help='the detectron2 sources (make official-src: .official/detectron2)')
  parser.add_argument('--only', help='comma-separated check numbers or names (default: all, in order)')
  parser.add_argument('--total-budget', type=float, help='seconds for everything (default 475 on a GPU, 900 smoke)')
  parser.add_argument(
    '--budget',
    action='append',
    default=[],
    metavar='CHECK=SECONDS',
    help="a check's budget (number or name), split over its parts in proportion; repeatable",
  )
  parser.add_argument('--download-wheels', metavar='DIR', help='(helper) download the GPU wheels into DIR and exit')
  parser.add_argument(
    '--prepare-official', nargs=2, metavar=('DIMASKDINO', 'DETECTRON2'), help='(helper) copy their sources and exit'
  )
  parser.add_argument('--dest', default=os.path.join(ROOT, '.official'), help='--prepare-official: target folder')
  args = parser.parse_args(argv)

  if args.download_wheels:
    download_wheels(args.download_wheels)
    return 0
  if args.prepare_official:
    prepare_official(*args.prepare_official, args.dest)
    return 0
  if not args.out:
    parser.error('OUT is required (the folder for gpu_check.json and gpu_check.log)')

  smoke = args.cpu_smoke
  total = args.total_budget or (900.0 if smoke else 475.0)
  t_start = time.monotonic()
  deadline = t_start + total
  os.makedirs(args.out, exist_ok=True)
  json_path = os.path.join(args.out, 'gpu_check.json')
  tmp = tempfile.mkdtemp(prefix='gpu_check_')
  site = os.path.join(tmp, 'site')

  env = dict(os.environ)
  env['PYTHONUNBUFFERED'] = '1'
  env['PYTHONPATH'] = os.pathsep.join(p for p in (ROOT, env.get('PYTHONPATH', '')) if p)
  if smoke:
    env['JAX_PLATFORMS'] = 'cpu'
  else:
    env.setdefault('JAX_PLATFORMS', 'cuda,cpu')  # tests/conftest.py would pick the CPU otherwise
    env.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')  # peak memory = what was used; torch shares the GPU

  official, detectron2 = (os.path.abspath(p) if p else None for p in (args.official, args.detectron2))
  checks = plan(smoke, official, detectron2, tmp)
  if args.only:
    keep = {s.strip() for s in args.only.split(',') if s.strip()}
    unknown = keep - {str(c['id']) for c in checks} - {c['name'] for c in checks}
    if unknown:
      parser.error(f'--only: unknown checks {sorted(unknown)}; choose from {list(CHECKS)} or 1-{len(checks)}')
    for c in checks:
      if str(c['id']) not in keep and c['name'] not in keep:
        c.pop('parts', None)
        c['skip'] = 'not selected (--only)'
  for spec in args.budget:
    key, _, seconds = spec.partition('=')
    match = [c for c in checks if key in (str(c['id']), c['name']) and 'parts' in c]
    try:
      seconds = float(seconds)
    except ValueError:
      match = []
    if not match:
      parser.error(f'--budget {spec}: expected CHECK=SECONDS with a check that runs ({list(CHECKS)} or 1-5)')
    scale = seconds / sum(p['budget_s'] for p in match[0]['parts'])
    for p in match[0]['parts']:
      p['budget_s'] = round(p['budget_s'] * scale, 1)

  report = {
    'mode': 'cpu-smoke' if smoke else 'gpu',
    'command': [sys.executable, *sys.argv] if argv is None else ['gpu_check.py', *argv],
    'started': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
    'total_budget_s': total,
    'setup': {},
    'checks': [],
  }
  try:
    report['git_commit'] = (
      subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
      or None
    )
  except (OSError, subprocess.SubprocessError):
    report['git_commit'] = None

  def save():
    report['wall_s'] = round(time.monotonic() - t_start, 1)
    with open(json_path + '.tmp', 'w') as f:
      json.dump(report, f, indent=1)
    os.replace(json_path + '.tmp', json_path)

  with open(os.path.join(args.out, 'gpu_check.log'), 'w') as log:
    install = install_wheels(args.wheels, args.install, site, env, log)
    report['setup']['install'] = install
    if install['status'] == 'ok':
      env['PYTHONPATH'] = os.pathsep.join((site, env['PYTHONPATH']))
    report['setup']['environment'] = environment(env, log, min(120.0, deadline - time.monotonic()))
    save()

    bank = 0.0  # seconds that earlier parts left unused
    for c in checks:
      entry = {'id': c['id'], 'name': c['name']}
      report['checks'].append(entry)
      if 'skip' in c:
        entry.update(status='skipped', reason=c['skip'])
        save()
        continue
      entry['budget_s'] = sum(p['budget_s'] for p in c['parts'])
      entry['parts'] = []
      t_check = time.monotonic()
      for p in c['parts']:
        part = {k: v for k, v in p.items() if k not in ('json', 'junit', 'fallback')}
        part['command'] = ' '.join(part.pop('cmd'))
        entry['parts'].append(part)
        left = deadline - time.monotonic()
        timeout = min(p['budget_s'] + bank, left)
        part['timeout_s'] = round(timeout, 1)
        if timeout < 5:
          part.update(status='skipped', reason='the total budget is spent', wall_s=0.0)
          continue
        print(f'[{c["id"]} {c["name"]} / {p["name"]}] up to {timeout:.0f} s', flush=True)
        part.update(run_part(p, timeout, log, env))
        bank = max(0.0, timeout - part['wall_s']) if part['status'] == 'ok' else 0.0
        save()
      entry['wall_s'] = round(time.monotonic() - t_check, 1)
      entry['status'] = _status(entry['parts'])
      if c['name'] == 'pallas_tests' and entry['status'] == 'ok':
        entry['status'] = 'pass'
      elif c['name'] == 'pallas_tests' and entry['parts'][0].get('result'):
        entry['status'] = 'fail'
      entry['figures'] = summarize(entry)
      save()
    report['goals'] = goals(report['checks'], smoke)
    report['finished'] = datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')
    save()
    summary = table(report)
    log.write(summary + '\n')
  shutil.rmtree(tmp, ignore_errors=True)
  print(summary, flush=True)
  print(f'wrote {json_path} and {os.path.join(args.out, "gpu_check.log")}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
