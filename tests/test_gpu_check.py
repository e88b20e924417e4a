"""benchmarks/gpu_check.py: the --cpu-smoke run end to end (every check present, with its status, figures and
budgets), the time limits, the goals' arithmetic, the wheel-folder checks and the official-source copy."""

import json
import os
import subprocess
import sys
import time
import tomllib

import pytest

from benchmarks import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILL_SLACK_S = 10.0  # a killed part's wall time may pass its limit by the kill and the reaping of its processes


@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
  out = tmp_path_factory.mktemp('gpu_check')
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  t0 = time.monotonic()
  proc = subprocess.run(
    [sys.executable, 'benchmarks/gpu_check.py', str(out), '--cpu-smoke'],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=1200,
  )
  wall = time.monotonic() - t0
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  with open(out / 'gpu_check.json') as f:
    report = json.load(f)
  return report, (out / 'gpu_check.log').read_text(), proc.stdout, wall


def test_cpu_smoke_runs_every_check_in_order_within_its_budget(smoke):
  report, log, stdout, wall = smoke
  assert report['mode'] == 'cpu-smoke'
  assert [c['name'] for c in report['checks']] == list(gpu_check.CHECKS)
  assert [c['id'] for c in report['checks']] == [1, 2, 3, 4, 5]
  assert report['wall_s'] <= report['total_budget_s']
  assert wall <= report['total_budget_s'] + 60  # + the interpreter's start and the closing table
  env = report['setup']['environment']
  assert env['status'] == 'ok', env
  assert env['versions']['jax'] and env['devices'] == ['cpu:cpu']
  assert all(v == 'ok' for v in env['imports'].values())
  for c in report['checks'][:4]:
    assert c['status'] in ('ok', 'pass'), c
    for p in c['parts']:
      assert p['status'] == 'ok', p
      # each part ran under its own limit: its budget plus what earlier parts left unused, never past the total
      assert 0 < p['wall_s'] <= p['timeout_s'] + KILL_SLACK_S
      assert p['timeout_s'] >= p['budget_s']  # the smoke's total budget is never the binding limit
      assert p['command'] in log  # every child's command and output are in the log
  official = report['checks'][4]
  assert official['status'] == 'skipped' and 'paths' in official['reason']
  assert 'gpu_check (cpu-smoke)' in stdout  # the closing table


def test_cpu_smoke_figures(smoke):
  report = smoke[0]
  checks = {c['name']: c for c in report['checks']}
  tests = checks['pallas_tests']['figures']
  assert tests['passed'] >= 1 and tests['failures'] == 0 and tests['errors'] == 0

  msda = checks['msda']['figures']
  assert msda['bandwidth_gbs'] > 0 and msda['bandwidth_source'] == 'numpy host copy'
  shapes = msda['shapes']
  assert 'pallas' not in shapes  # compiled Pallas runs on GPUs only
  for impl in ('xla', 'floor'):
    assert shapes[impl]['fwd_ms'] > 0 and shapes[impl]['fwdbwd_ms'] > shapes[impl]['fwd_ms'] * 0.5
  # the floor is a lower bound of the measured times
  assert shapes['floor']['fwd_ms'] < shapes['xla']['fwd_ms']
  assert shapes['floor']['fwdbwd_ms'] < shapes['xla']['fwdbwd_ms']

  inference = checks['inference']['figures']
  assert inference['paper_fps'] == {'DI-MaskDINO': 7.7, 'MaskDINO': 8.0}
  assert sorted(inference['variants']) == ['b1_bfloat16', 'b2_float32']
  for name, r in inference['variants'].items():
    assert r['batch_size'] == int(name[1]) and r['backbone_dtype'] == name.split('_')[1]
    assert r['compile_s'] > 0 and r['images_per_s'] > 0
    assert r['images_per_s'] == pytest.approx(r['batch_size'] / (r['median_ms'] / 1000), rel=1e-2)
    assert r['vs_paper']['DI-MaskDINO'] == pytest.approx(r['images_per_s'] / 7.7, rel=1e-2)
    # the weights are arguments of the compiled call: XLA's peak holds them and the images
    assert r['xla_peak_bytes'] > r['weight_bytes'] + r['batch_size'] * 64 * 64 * 3

  train = checks['train_step']['figures']['variants']
  assert list(train) == ['b2_remat_on']
  r = train['b2_remat_on']
  assert r['remat'] is True and r['batch_size'] == 2 and r['images_per_s'] > 0
  assert r['peak_source'].startswith("XLA's memory analysis")  # no device statistics on a CPU
  assert r['peak_gib_per_image'] == pytest.approx(r['xla_peak_bytes'] / 2 / 2**30, rel=1e-2)


def test_cpu_smoke_goals_are_computed_from_the_measurements(smoke):
  report = smoke[0]
  g = report['goals']
  assert set(g) == {'pallas_2x_xla_encoder_fwdbwd', 'r50_bf16_2x_paper_fps', 'train_remat_le_12gib_per_image'}
  assert all(v['meaningful'] is False for v in g.values())
  assert g['pallas_2x_xla_encoder_fwdbwd']['pass'] is None  # no Pallas timing on a CPU
  fps = {c['name']: c for c in report['checks']}['inference']['figures']['variants']['b1_bfloat16']['images_per_s']
  assert g['r50_bf16_2x_paper_fps']['value'] == fps
  assert g['r50_bf16_2x_paper_fps']['pass'] is (fps >= 15.4)
  assert g['train_remat_le_12gib_per_image']['per_variant'].keys() == {'b2_remat_on'}


def test_the_gpu_plan_runs_the_issue_s_checks_within_8_minutes(tmp_path):
  official, d2 = str(tmp_path / 'DI-MaskDINO'), str(tmp_path / 'detectron2')
  os.makedirs(official)
  os.makedirs(d2)
  checks = gpu_check.plan(False, official, d2, str(tmp_path))
  assert [c['name'] for c in checks] == list(gpu_check.CHECKS)
  cmd = lambda part: ' '.join(part['cmd'])  # noqa: E731
  assert cmd(checks[0]['parts'][0]).endswith(
    f'-m pytest tests/kernels -k pallas -q -p no:cacheprovider -o addopts= --junitxml={tmp_path}/pallas_tests.xml'
  )
  msda = cmd(checks[1]['parts'][0])
  assert '--sizes encoder,decoder' in msda and '--impls xla,pallas,torch' in msda and '--torch-device cuda' in msda
  inference = {(p['batch_size'], p['dtype']): cmd(p) for p in checks[2]['parts']}
  assert sorted(inference) == [(1, 'bfloat16'), (1, 'float32'), (8, 'bfloat16'), (8, 'float32')]
  for (bsz, dtype), c in inference.items():
    assert f'--config {gpu_check.R50} --canvas 800 1344 --batch-size {bsz} --dtype {dtype}' in c
    assert '--fast-compile' not in c
  train = {(p['batch_size'], p['remat']): cmd(p) for p in checks[3]['parts']}
  assert sorted(train) == [(2, False), (2, True), (8, False), (8, True)]
  for (bsz, remat), c in train.items():
    assert f'--config {gpu_check.R50} --batch_size {bsz}' in c and f'--config.model.remat={remat}' in c
    assert '--fast_compile' not in c
  for p in checks[2]['parts'] + checks[3]['parts']:
    assert p['fallback'] == p['cmd'] + ['--config.model.msda_impl=xla']
  five = checks[4]
  if os.path.isfile(os.path.join(ROOT, 'benchmarks', 'vs_official.py')):
    assert cmd(five['parts'][0]).endswith(
      f'benchmarks/vs_official.py --official {official} --detectron2 {d2} --device cuda --skip-train '
      f'--json {tmp_path}/official.json'
    )
  else:
    assert five['skip'] == 'benchmarks/vs_official.py is not in this tree'
  assert gpu_check.plan(False, None, None, str(tmp_path))[4]['skip'] == 'no --official / --detectron2 paths given'
  # the budgets fit the default total, which leaves 5 s of the 480 s (8 min) for the start-up
  budgets = sum(p['budget_s'] for c in checks for p in c.get('parts', []))
  assert budgets <= 475 - 20  # 20 s for installing the wheels and recording the environment


def test_goals_thresholds():
  def report(xla_ms, pallas_ms, fps, gib_per_image):
    return [
      {'name': 'msda', 'figures': {'encoder': {'pallas_speedup_vs_xla_fwdbwd': xla_ms / pallas_ms}}},
      {'name': 'inference', 'figures': {'variants': {'b1_bfloat16': {'images_per_s': fps}}}},
      {
        'name': 'train_step',
        'figures': {
          'variants': {
            'b2_remat_on': {'remat': True, 'peak_gib_per_image': gib_per_image},
            'b2_remat_off': {'remat': False, 'peak_gib_per_image': 3 * gib_per_image},
          }
        },
      },
      {'name': 'official', 'figures': {'result': {'official': {'images_per_s': fps / 3}}}},
    ]

  # the issue's goals: Pallas >= 2x XLA; >= 2 x 7.7 FPS; <= 12 GiB per image with remat (remat off not counted)
  good = gpu_check.goals(report(10.0, 4.0, 15.5, 11.9), smoke=False)
  assert [good[k]['pass'] for k in sorted(good)] == [True, True, True]
  assert good['r50_bf16_2x_paper_fps']['ratio_to_official_same_device'] == pytest.approx(3.0)
  bad = gpu_check.goals(report(10.0, 5.5, 15.3, 12.1), smoke=False)
  assert [bad[k]['pass'] for k in sorted(bad)] == [False, False, False]
  assert all(v['meaningful'] for v in bad.values())


def _running(pid: int) -> bool:
  """Whether `pid` is alive (a zombie waiting for its reaper counts as ended)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except FileNotFoundError:
    return False


def test_a_part_past_its_limit_is_killed_with_its_children(tmp_path):
  pidfile = tmp_path / 'grandchild.pid'
  code = (
    'import subprocess, sys, time; '
    f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); open({str(pidfile)!r}, 'w')"
    '.write(str(p.pid)); print("started", flush=True); time.sleep(60)'
  )
  with open(tmp_path / 'log', 'w') as log:
    t0 = time.monotonic()
    r = gpu_check.run_child([sys.executable, '-c', code], 3.0, log)
  assert r['status'] == 'timeout' and time.monotonic() - t0 < 3.0 + KILL_SLACK_S
  assert 'started' in r['tail']
  pid = int(pidfile.read_text())
  time.sleep(0.5)
  assert not _running(pid)  # the whole process group went, the grandchild too
  with open(tmp_path / 'log', 'w') as log:
    assert gpu_check.run_child([sys.executable, '-c', 'raise SystemExit(3)'], 30, log)['status'] == 'failed'


def test_a_failed_part_runs_its_fallback_within_its_limit(tmp_path):
  js = tmp_path / 'r.json'
  fail = [sys.executable, '-c', 'raise SystemExit("the Triton kernel did not compile")']
  write = [sys.executable, '-c', f'import json; json.dump({{"images_per_s": 3.0}}, open({str(js)!r}, "w"))']
  with open(tmp_path / 'log', 'w') as log:
    r = gpu_check.run_part({'cmd': fail, 'json': str(js), 'fallback': write}, 60, log, None)
    assert r['status'] == 'ok' and r['result'] == {'images_per_s': 3.0}
    assert r['fallback']['first_run']['status'] == 'failed'
    assert 'did not compile' in '\n'.join(r['fallback']['first_run']['tail'])
    js.unlink()
    # no fallback for a part that ran out of time, nor without one
    slow = [sys.executable, '-c', 'import time; time.sleep(30)']
    r = gpu_check.run_part({'cmd': slow, 'json': str(js), 'fallback': write}, 2, log, None)
    assert r['status'] == 'timeout' and 'fallback' not in r and r['result'] is None and not js.exists()
    r = gpu_check.run_part({'cmd': fail, 'json': str(js)}, 60, log, None)
    assert r['status'] == 'failed' and 'fallback' not in r


def test_wheel_folder_checks(tmp_path):
  with pytest.raises(ValueError, match='no wheels'):
    gpu_check.check_wheels(str(tmp_path))
  (tmp_path / 'grain-0.2.18-cp312-cp312-manylinux_2_28_x86_64.whl').write_bytes(b'x' * 3 * 2**20)
  (tmp_path / 'dm_tree-0.1.10-cp312-cp312-manylinux_2_28_x86_64.whl').write_bytes(b'x' * 2**20)
  info = gpu_check.check_wheels(str(tmp_path), max_mib=5)
  assert info['count'] == 2 and info['mib'] == pytest.approx(4.0)
  with pytest.raises(ValueError, match='4.0 MiB, more than the 3 MiB'):
    gpu_check.check_wheels(str(tmp_path), max_mib=3)
  (tmp_path / 'grain-0.2.17-cp312-cp312-manylinux_2_28_x86_64.whl').write_bytes(b'x')
  with pytest.raises(ValueError, match='more than one wheel of grain'):
    gpu_check.check_wheels(str(tmp_path), max_mib=50)


def test_gpu_wheels_follow_the_project_pins():
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    deps = tomllib.load(f)['project']['dependencies']
  pins = {}
  for d in deps:
    name, _, version = d.split(';')[0].strip().partition('==')
    if version:
      pins[name.lower().replace('_', '-')] = version.strip()
  carried = dict(w.lower().split('==') for w in gpu_check.GPU_WHEELS + gpu_check.GPU_SDISTS)
  for name, version in carried.items():
    if name in pins:
      assert version == pins[name], name
  # what the GPU machine has is not carried (its jax, numpy, flax ... stay)
  assert not set(carried) & {'jax', 'jaxlib', 'numpy', 'flax', 'optax', 'orbax-checkpoint', 'scipy', 'torch'}
  # every direct dependency is either carried or on the machine
  on_machine = {'jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'scipy', 'pillow', 'tqdm'}
  on_machine |= {'matplotlib', 'flatbuffers'}
  assert set(pins) <= set(carried) | on_machine, set(pins) - set(carried) - on_machine


def test_prepare_official_copies_the_sources_only(tmp_path):
  di, d2 = tmp_path / 'DI-MaskDINO', tmp_path / 'd2'
  files = {
    di / 'maskdino' / 'maskdino.py': 'x',
    di / 'configs' / 'coco' / 'r50.yaml': 'y',
    di / 'maskdino' / 'ops' / 'src' / 'cuda' / 'ms_deform_attn_cuda.cu': 'z',
    di / 'maskdino' / 'ops' / 'src' / 'vision.cpp': 'z',
    di / 'weights.pth': 'w',
    di / '.git' / 'config.py': 'g',
    di / 'maskdino' / '__pycache__' / 'm.py': 'c',
    d2 / 'detectron2' / 'layers' / 'batch_norm.py': 'b',
    d2 / 'tools' / 'train_net.py': 't',
  }
  for path, text in files.items():
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  dest = tmp_path / 'dest'
  info = gpu_check.prepare_official(str(di), str(d2), str(dest))
  copied = sorted(str(p.relative_to(dest)) for p in dest.rglob('*') if p.is_file())
  assert copied == [
    'DI-MaskDINO/configs/coco/r50.yaml',
    'DI-MaskDINO/maskdino/maskdino.py',
    'DI-MaskDINO/maskdino/ops/src/cuda/ms_deform_attn_cuda.cu',
    'DI-MaskDINO/maskdino/ops/src/vision.cpp',
    'detectron2/detectron2/layers/batch_norm.py',
  ]
  assert info['DI-MaskDINO']['files'] == 4 and info['detectron2']['files'] == 1
  with pytest.raises(ValueError, match='not a directory'):
    gpu_check.prepare_official(str(di), str(tmp_path / 'missing'), str(dest))


def test_parse_junit(tmp_path):
  xml = tmp_path / 'r.xml'
  xml.write_text(
    '<testsuites><testsuite tests="4" failures="1" errors="0" skipped="1">'
    '<testcase classname="t" name="a"/><testcase classname="t" name="b"><failure message="boom"/></testcase>'
    '<testcase classname="t" name="c"><skipped message="no torch"/></testcase><testcase classname="t" name="d"/>'
    '</testsuite></testsuites>'
  )
  r = gpu_check.parse_junit(str(xml))
  assert (r['tests'], r['passed'], r['failures'], r['skipped']) == (4, 2, 1, 1)
  assert r['failed'] == [{'test': 't::b', 'message': 'boom'}]
  assert r['skipped_tests'] == [{'test': 't::c', 'message': 'no torch'}]
