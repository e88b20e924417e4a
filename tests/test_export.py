"""jax.export of the inference function: serialized, reloaded, and equal to the live model; the CLI writes the file."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dimaskdino_jax import export
from dimaskdino_jax.evaluation import evaluator
from dimaskdino_jax.modeling.model import build_model
from dimaskdino_jax.training.checkpoint import Checkpointer
from tests.cuda_compile_env import run_module
from tests.evaluation.test_evaluator import FAST, TINY_OVERRIDES, tiny_config
from tests.tiny import init_variables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def variables():
  return init_variables('evaluator_tiny', lambda: tiny_config('unused'))  # shared with test_inference.py


def assert_matches_live_model(config, variables, exported):
  """Calls `exported` (batch 2, 64 x 64) on this CPU and compares every output with the live model's; returns them."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
  image_hw = np.asarray([[64, 64], [48, 64]], np.int32)
  reloaded = jax.jit(exported.call).lower(images, image_hw).compile(compiler_options=FAST)(images, image_hw)
  model, k = build_model(config), int(config.eval.detections_per_image)
  (live,) = evaluator.make_predict_fn(model, k, True, False, tuple(sorted(FAST.items())))(variables, images, image_hw)
  assert len(reloaded) == 5
  for name, got in zip(export.OUTPUT_NAMES, reloaded):
    want = np.asarray(getattr(live, name))
    assert got.shape == want.shape and got.dtype == want.dtype, name
    if want.dtype.kind in 'iu':
      np.testing.assert_array_equal(got, want, err_msg=name)
    else:
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)
  return reloaded


def test_exported_model_matches_live_model(variables, tmp_path):
  config = tiny_config('unused')
  exported = export.export_predict(config, variables, (64, 64), batch_size=2)
  path = str(tmp_path / 'model.bin')
  export.save_exported(exported, path, {'canvas': [64, 64]})
  loaded, meta = export.load_exported(path)
  assert meta['canvas'] == [64, 64] and meta['inputs'][0] == {'shape': [2, 64, 64, 3], 'dtype': 'uint8'}
  assert [o['name'] for o in meta['outputs']] == list(export.OUTPUT_NAMES)

  reloaded = assert_matches_live_model(config, variables, loaded)
  # The two images differ (a real input dependence, not constant outputs).
  assert not np.allclose(reloaded[0][0], reloaded[0][1])


def test_export_cli(variables, tmp_path):
  workdir = tmp_path / 'run'
  state = {**variables, 'opt_state': {}, 'step': jnp.asarray(2, jnp.int32), 'rng': jax.random.key(1)}
  with Checkpointer(str(workdir), tiny_config('unused'), async_save=False) as ckpt:
    assert ckpt.save(2, state)
  args = ['--config', os.path.join(REPO, 'configs', 'shapes.py'), '--config.data.data_dir=unused']
  args += [f'--config.{k}={v}' for k, v in TINY_OVERRIDES.items()]
  export.main(args + ['--workdir', str(workdir), '--out', str(tmp_path / 'm.bin')])
  exported, meta = export.load_exported(str(tmp_path / 'm.bin'))
  assert meta['step'] == 2 and meta['canvas'] == [64, 64] and meta['batch_size'] == 1
  assert exported.in_avals[0].shape == (1, 64, 64, 3)
  assert meta['class_names'] == ['class_0', 'class_1', 'class_2']  # no prepared dataset under 'unused'
  with pytest.raises(SystemExit, match='multiple of'):
    export.main(args + ['--workdir', str(workdir), '--out', str(tmp_path / 'm.bin'), '--canvas', '64', '50'])


def test_export_for_cpu_and_cuda_from_a_cpu_machine(variables):
  # One file for both platforms, lowered here without a GPU; its CPU entry gives the live model's outputs. The
  # deformable attention is the 'xla' formulation there (the one both run), the live model uses 'dense'.
  config = tiny_config('unused')
  exported = export.export_predict(config, variables, (64, 64), batch_size=2, platforms=('cpu', 'cuda'))
  assert exported.platforms == ('cpu', 'cuda')
  reloaded = jax.export.deserialize(exported.serialize())
  assert reloaded.platforms == ('cpu', 'cuda')
  assert_matches_live_model(config, variables, reloaded)


def test_export_for_cuda_lowers_the_triton_kernel(variables):
  # For ('cuda',) alone, impl='pallas' is the Triton kernel itself (not its CPU interpretation); it cannot share a
  # lowering with the CPU.
  config = tiny_config('unused')
  config.model.msda_impl = 'pallas'
  try:
    exported = export.export_predict(config, variables, (64, 64), platforms=('cuda',))
  except Exception as e:  # noqa: BLE001 - as in tests/kernels: a jaxlib that cannot lower for cuda at all
    if 'cuda' in str(e).lower() and 'platform' in str(e).lower():
      pytest.skip(f'this jaxlib cannot lower for cuda without a GPU: {e}')
    raise
  assert exported.platforms == ('cuda',)
  assert export.TRITON_CALL in exported.mlir_module()
  assert jax.export.deserialize(exported.serialize()).platforms == ('cuda',)
  with pytest.raises(ValueError, match='cannot be lowered for'):
    export.export_predict(config, variables, (64, 64), platforms=('cpu', 'cuda'))
  # No trace made for CUDA is reused on this CPU: the live model runs its own (interpreted) kernel here.
  images, image_hw = np.zeros((1, 64, 64, 3), np.uint8), np.asarray([[64, 64]], np.int32)
  predict = evaluator.make_predict_fn(build_model(config), 5, True, False, tuple(sorted(FAST.items())))
  (live,) = predict(variables, images, image_hw)
  assert np.isfinite(np.asarray(live.scores)).all()


def test_cuda_export_compiles_for_an_h100_without_a_gpu(variables, tmp_path):
  # XLA's GPU compiler, run here on a described H100 (dimaskdino_jax/gpu_aot.py), turns the file exported for
  # ('cuda',) into machine code, the Pallas deformable-attention kernels included ('auto' picks them on GPUs).
  config = tiny_config('unused')
  exported = export.export_predict(config, variables, (64, 64), batch_size=2, platforms=('cuda',))
  path, out = str(tmp_path / 'cuda.bin'), str(tmp_path / 'aot.json')
  export.save_exported(exported, path, {})
  run_module('dimaskdino_jax.gpu_aot', path, '--target', 'h100', '--json', out)
  with open(out) as f:
    _check_h100_compile(config, json.load(f), exported.out_avals)


def test_gpu_aot_compiles_a_config_with_random_weights(tmp_path):
  # The --config mode: the model of a config (+ overrides) with random weights, exported in memory, then compiled.
  config = tiny_config('unused')
  out = str(tmp_path / 'aot.json')
  args = ['--config', os.path.join(REPO, 'configs', 'shapes.py'), '--config.data.data_dir=unused']
  args += [f'--config.{k}={v}' for k, v in TINY_OVERRIDES.items()]
  run_module('dimaskdino_jax.gpu_aot', *args, '--canvas', '64', '64', '--batch-size', '2', '--json', out)
  with open(out) as f:
    result = json.load(f)
  variables = init_variables('evaluator_tiny', lambda: config)
  assert result['weight_bytes'] == sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(variables)), result
  _check_h100_compile(config, result, None)


def _check_h100_compile(config, result, out_avals):
  # one deformable-attention kernel per encoder and decoder layer, all compiled by XLA, none dropped or replaced
  layers = config.model.encoder.num_layers + config.model.decoder.num_layers
  assert result['triton_calls_compiled'] == layers, result
  assert result['kernel_names'] == ['ms_deform_attn_fwd'], result
  # XLA's buffer assignment: the arguments are exactly the inputs, batch 2 of 64 x 64 (the weights are constants)
  assert result['argument_bytes'] == 2 * 64 * 64 * 3 + 2 * 2 * 4, result
  if out_avals is not None:
    assert result['output_bytes'] >= sum(a.size * a.dtype.itemsize for a in out_avals), result
  assert result['temp_bytes'] > 0 and result['peak_bytes'] > result['argument_bytes'], result


def test_gpu_aot_refuses_a_file_not_exported_for_cuda(variables):
  from dimaskdino_jax import gpu_aot

  exported = export.export_predict(tiny_config('unused'), variables, (64, 64), platforms=('cpu',))
  with pytest.raises(ValueError, match='--platforms cuda'):
    gpu_aot.compile_exported(exported)
