"""The import direction of the package holds, and every module imports on its own.

Layers, bottom to top (a layer may import its own modules and the layers it lists, nothing else):

  base         dimaskdino_jax (package), box_ops, config, runtime
  kernels      the Pallas / reference kernels (top-level package `kernels`)
  modeling     the Flax model
  losses       criterion, matcher
  data         input pipeline; no model code
  checkpoints  training/checkpoint.py: writing, finding and reading checkpoints (below every reader of one)
  evaluation   COCO evaluation, inference
  convert      official .pth checkpoints, initial weights
  training     the trainer (runs the periodic evaluation, loads initial weights)
  entry        train.py / eval.py / predict.py, demo, export, gpu_aot, summary, analysis

Every import counts, at module level or inside a function: a lazy import that points upward is a hidden cycle.
"""

import ast
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ALLOWED = {
  'base': {'base'},
  'kernels': {'base', 'kernels'},
  'modeling': {'base', 'kernels', 'modeling'},
  'losses': {'base', 'kernels', 'modeling', 'losses'},
  'data': {'base', 'data'},
  'checkpoints': {'base', 'kernels', 'modeling', 'checkpoints'},
  'evaluation': {'base', 'kernels', 'modeling', 'data', 'checkpoints', 'evaluation'},
  'convert': {'base', 'kernels', 'modeling', 'data', 'checkpoints', 'convert'},
  'training': {'base', 'kernels', 'modeling', 'losses', 'data', 'checkpoints', 'evaluation', 'convert', 'training'},
}


def layer_of(module: str) -> str:
  parts = module.split('.')
  if parts[0] == 'kernels':
    return 'kernels'
  if parts[0] != 'dimaskdino_jax':
    return 'entry'
  if len(parts) == 1 or parts[1] in ('box_ops', 'config', 'runtime'):
    return 'base'
  if parts[1] == 'training' and parts[2:3] == ['checkpoint']:
    return 'checkpoints'
  if parts[1] in ('modeling', 'losses', 'data', 'evaluation', 'convert', 'training'):
    return parts[1]
  return 'entry'  # demo, export, gpu_aot, summary, analysis


def project_modules() -> dict[str, str]:
  """module name -> file, for dimaskdino_jax and kernels."""
  out = {}
  for top in ('dimaskdino_jax', 'kernels'):
    for root, dirs, files in os.walk(os.path.join(REPO, top)):
      dirs[:] = [d for d in dirs if not d.startswith(('.', '__'))]
      for f in files:
        if f.endswith('.py'):
          rel = os.path.relpath(os.path.join(root, f), REPO)[:-3].replace(os.sep, '.')
          out[rel.removesuffix('.__init__')] = os.path.join(root, f)
  return out


def imports_of(path: str, known: set[str]) -> list[tuple[str, int]]:
  """(imported project module, line) for every import statement of the file, nested ones included."""
  tree = ast.parse(open(path).read(), path)
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [(a.name, node.lineno) for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      for alias in node.names:  # `from pkg import submodule` imports the submodule
        sub = f'{node.module}.{alias.name}'
        found.append((sub if sub in known else node.module, node.lineno))
  return [(m, line) for m, line in found if m.split('.')[0] in ('dimaskdino_jax', 'kernels')]


def test_layer_of_classifies_every_layer():
  assert layer_of('dimaskdino_jax.training.checkpoint') == 'checkpoints'
  assert layer_of('dimaskdino_jax.training.trainer') == 'training'
  assert layer_of('dimaskdino_jax.analysis.runner') == 'entry'
  assert layer_of('kernels.per_shard') == 'kernels'
  assert layer_of('dimaskdino_jax.config') == 'base'


def test_imports_point_down_only():
  modules = project_modules()
  violations = []
  for module, path in sorted(modules.items()):
    layer = layer_of(module)
    if layer == 'entry':
      continue
    for imported, line in imports_of(path, set(modules)):
      target = layer_of(imported)
      if target not in ALLOWED[layer]:
        violations.append(f'{os.path.relpath(path, REPO)}:{line}: {module} ({layer}) imports {imported} ({target})')
  # Nothing imports an entry point (train.py / eval.py / predict.py or the tools).
  for module, path in sorted(modules.items()):
    for imported, line in imports_of(path, set(modules)):
      if layer_of(imported) == 'entry' and layer_of(module) != 'entry':
        violations.append(f'{os.path.relpath(path, REPO)}:{line}: {module} imports the entry point {imported}')
  assert not violations, 'imports against the layer order:\n' + '\n'.join(violations)


def test_a_violation_is_found(tmp_path):
  """The checker sees a lazy (function-level) upward import."""
  bad = tmp_path / 'bad.py'
  bad.write_text('def f():\n  from dimaskdino_jax.training.trainer import train\n')
  ((imported, line),) = imports_of(str(bad), {'dimaskdino_jax.training.trainer'})
  assert (imported, line) == ('dimaskdino_jax.training.trainer', 2)
  assert layer_of(imported) not in ALLOWED['evaluation']


def test_every_module_imports_fresh():
  """Each module imported first in a process with none of the project loaded (a cycle fails here at import)."""
  modules = sorted(m for m in project_modules() if not m.endswith('__main__'))
  script = (
    'import importlib, sys\n'
    'failed = []\n'
    f'for name in {modules!r}:\n'
    "  for loaded in [m for m in sys.modules if m.split('.')[0] in ('dimaskdino_jax', 'kernels')]:\n"
    '    del sys.modules[loaded]\n'
    '  try:\n'
    '    importlib.import_module(name)\n'
    '  except Exception as e:\n'
    "    failed.append(f'{name}: {type(e).__name__}: {e}')\n"
    "print('\\n'.join(failed))\n"
    'sys.exit(1 if failed else 0)\n'
  )
  proc = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
