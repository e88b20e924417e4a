"""The official-checkpoint converter: key table, strict errors, the CLI -> eval restore, ImageNet backbones.

No test here compiles the model: variables are random numpy arrays of the model's eval_shape tree. The mapping
itself is checked against the official code by tests/parity (the official state_dict converts with no key left
over and reproduces every stage).
"""

import json
import os
import pickle
import re

import jax
import numpy as np
import pytest

from dimaskdino_jax.config import load_config
from dimaskdino_jax.convert import CheckpointError, convert_backbone, convert_state_dict, read_state_dict
from dimaskdino_jax.convert import torch_checkpoint as tc
from dimaskdino_jax.convert.__main__ import main as convert_main
from dimaskdino_jax.training import checkpoint as ckpt_lib
from tests.tiny import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def random_variables(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


def assert_trees_equal(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (p, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(p))


@pytest.fixture(scope='module')
def tiny():
  c = tiny_config(**{'model.backbone.norm': 'FrozenBN'})  # the official backbone layout (FrozenBN buffers)
  shapes = tc.model_shapes(c)
  return c, shapes, random_variables(shapes)


def test_r50_state_dict_has_the_official_keys():
  """The R50 model maps to 716 keys holding 52,286,232 unique parameters: the counts of the official state_dict
  (computed by running the official code); names spot-checked against docs/architecture.md, "Checkpoints"."""
  c = load_config(os.path.join(REPO, 'configs', 'dimaskdino_r50_coco.py'))
  shapes = tc.model_shapes(c)
  sd = tc.to_state_dict(jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes), c)
  assert len(sd) == 716
  unique = {}
  for k, v in sd.items():
    unique.setdefault(id(v), (k, v))
  learned = [v.size for k, v in unique.values() if not re.match(r'backbone\..*norm\.', k)]
  assert sum(learned) == 52_286_232
  p = 'sem_seg_head.predictor.'
  for key, shape in {
    'backbone.res5.0.shortcut.weight': (2048, 1024, 1, 1),
    'backbone.stem.conv1.norm.running_var': (64,),
    'sem_seg_head.pixel_decoder.input_proj.3.0.weight': (256, 2048, 3, 3),
    'sem_seg_head.pixel_decoder.transformer.encoder.layers.5.self_attn.sampling_offsets.weight': (256, 256),
    'sem_seg_head.pixel_decoder.adapter_1.norm.weight': (256,),
    p + 'decoder.layers.5.self_attn.in_proj_weight': (768, 256),
    p + 'decoder.layers.0.linear1.weight': (2048, 256),
    p + 'oldm.layers.1.self_attn.in_proj_bias': (768,),
    p + 'oldm.ref_point_head.layers.0.weight': (256, 512),
    p + '_oldm_bbox_embed.layers.2.weight': (4, 256),
    p + 'oldm.bbox_embed.1.layers.2.weight': (4, 256),
    p + 'decoder.query_guide_feature_update.linear2.weight': (256, 2048),
    p + 'decoder.mask_output_conv.norm.bias': (256,),
    p + 'label_enc.weight': (80, 256),
  }.items():
    assert sd[key].shape == shape, key


def test_maskdino_config_has_the_official_maskdino_keys():
  """configs/maskdino_r50_coco.py against the keys and shapes of the official MaskDINODecoder (R50 instance config,
  built by tests/parity/make_fixtures.py --maskdino); backbone and pixel decoder are DI-MaskDINO's (tests/parity)."""
  with open(os.path.join(REPO, 'tests', 'parity', 'fixtures', 'maskdino_r50_predictor_keys.json')) as f:
    official = {k: tuple(v) for k, v in json.load(f)['keys'].items()}
  c = load_config(os.path.join(REPO, 'configs', 'maskdino_r50_coco.py'))
  shapes = tc.model_shapes(c)
  sd = tc.to_state_dict(jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes), c)
  ours = {k: v.shape for k, v in sd.items() if k.startswith('sem_seg_head.predictor.')}
  assert ours == official
  convert_state_dict(sd, c, shapes=shapes)


def test_round_trip(tiny):
  c, shapes, variables = tiny
  sd = tc.to_state_dict(variables, c)
  assert 'sem_seg_head.predictor.decoder.layers.0.self_attn.in_proj_weight' in sd
  # Layouts: Linear (out, in), Conv (O, I, kh, kw), in_proj rows q | k | v.
  q = variables['params']['predictor']['decoder_layers_0']['self_attn']['q_proj']['kernel']
  np.testing.assert_array_equal(sd['sem_seg_head.predictor.decoder.layers.0.self_attn.in_proj_weight'][:32], q.T)
  k = variables['params']['backbone']['stem']['conv']['kernel']  # (7, 7, 3, C)
  np.testing.assert_array_equal(sd['backbone.stem.conv1.weight'], k.transpose(3, 2, 0, 1))
  assert_trees_equal(convert_state_dict(sd, c, shapes=shapes), variables)
  # {'model': sd} in a .pkl (detectron2's format) reads back identically, without torch.
  assert_trees_equal(convert_state_dict(dict(sd), c, shapes=shapes), variables)


def test_errors_list_every_problem(tiny, tmp_path):
  c, shapes, variables = tiny
  sd = tc.to_state_dict(variables, c)
  p = 'sem_seg_head.predictor.'
  del sd[p + 'enc_output.weight']
  sd[p + 'not_a_module.weight'] = np.zeros(3, np.float32)
  sd[p + 'class_embed.weight'] = np.zeros((7, 32), np.float32)
  sd[p + 'decoder.norm.weight'] = sd[p + 'decoder.norm.weight'] + 1  # a duplicate that differs from decoder_norm
  path = tmp_path / 'bad.pkl'
  with open(path, 'wb') as f:
    pickle.dump({'model': sd, 'iteration': 5}, f)
  with pytest.raises(CheckpointError) as e:
    convert_state_dict(read_state_dict(path), c, source=str(path), shapes=shapes)
  msg = str(e.value)
  assert str(path) in msg
  assert '1 missing keys' in msg and p + 'enc_output.weight' in msg
  assert '1 unexpected keys' in msg and p + 'not_a_module.weight' in msg
  assert f'{p}class_embed.weight: (7, 32) vs (3, 32)' in msg
  assert f'{p}decoder.norm.weight != {p}decoder_norm.weight' in msg


def test_paper_formulation_has_no_official_checkpoint():
  c = tiny_config(**{'model.formulation': 'paper', 'model.backbone.norm': 'FrozenBN'})
  with pytest.raises(CheckpointError, match='di_residual'):
    tc.key_table(tc.model_shapes(c))


def test_read_state_dict_errors(tmp_path):
  with pytest.raises(CheckpointError, match='no such file'):
    read_state_dict(tmp_path / 'missing.pth')
  (tmp_path / 'x.safetensors').write_bytes(b'')
  with pytest.raises(CheckpointError, match='unknown checkpoint format'):
    read_state_dict(tmp_path / 'x.safetensors')
  with open(tmp_path / 'list.pkl', 'wb') as f:
    pickle.dump([np.zeros(2)], f)
  with pytest.raises(CheckpointError, match='expected a state_dict'):
    read_state_dict(tmp_path / 'list.pkl')


def test_cli_writes_a_checkpoint_eval_restores(tmp_path, capsys):
  """python -m dimaskdino_jax.convert -> OUT; eval.py's resolve_checkpoint / restore_variables read it back."""
  config_path = os.path.join(REPO, 'configs', 'shapes.py')
  c = load_config(config_path)
  shapes = tc.model_shapes(c)
  variables = random_variables(shapes, seed=1)
  ckpt = tmp_path / 'official.pkl'
  with open(ckpt, 'wb') as f:
    pickle.dump(tc.to_state_dict(variables, c), f)  # a bare state_dict
  out = tmp_path / 'converted'
  step_dir = convert_main(['--checkpoint', str(ckpt), '--config', config_path, '--out', str(out)])
  assert 'converted' in capsys.readouterr().out
  assert ckpt_lib.resolve_checkpoint(workdir=str(out)) == (step_dir, 0)
  assert_trees_equal(ckpt_lib.restore_variables(c, step_dir), variables)
  with pytest.raises(SystemExit, match='already exists'):
    convert_main(['--checkpoint', str(ckpt), '--config', config_path, '--out', str(out)])
  with pytest.raises(SystemExit, match='missing keys'):  # the wrong config for this checkpoint
    convert_main(
      ['--checkpoint', str(ckpt), '--config', os.path.join(REPO, 'configs', 'maskdino_r50_coco.py'), '--out', 'x']
    )


def torchvision_names(d2_backbone):
  """detectron2 backbone keys -> torchvision ResNet keys (the inverse of convert-torchvision-to-d2)."""
  out = {}
  for k, v in d2_backbone.items():
    k = k[len('backbone.') :]
    k = re.sub(r'^stem\.conv1\.norm\.', 'bn1.', k)
    k = re.sub(r'^stem\.conv1\.', 'conv1.', k)
    k = re.sub(r'^res(\d)\.', lambda m: f'layer{int(m.group(1)) - 1}.', k)
    k = re.sub(r'conv(\d)\.norm\.', r'bn\1.', k)
    k = k.replace('shortcut.norm.', 'downsample.1.').replace('shortcut.', 'downsample.0.')
    out[k] = v
  return out


def test_imagenet_backbones(tiny, tmp_path):
  c, shapes, variables = tiny
  sd = tc.to_state_dict(variables, c)
  backbone = {k: v for k, v in sd.items() if k.startswith('backbone.')}
  want = {col: {'backbone': variables[col]['backbone']} for col in ('params', 'frozen_bn')}
  # torchvision resnet*.pth layout, with the classifier and BN step counters it carries.
  tv = torchvision_names(backbone)
  assert 'layer2.0.downsample.1.running_var' in tv and 'bn1.weight' in tv
  tv.update({'fc.weight': np.zeros((10, 8)), 'fc.bias': np.zeros(10), 'bn1.num_batches_tracked': np.zeros(())})
  assert_trees_equal(convert_backbone(tv, c, shapes=shapes), want)
  # detectron2 R-50.pkl: {'model': {'stem.conv1.weight', 'res2.0.conv1.norm.weight', ..., 'stem.fc.weight'}}.
  d2 = {k[len('backbone.') :]: v for k, v in backbone.items()}
  d2['stem.fc.weight'] = np.zeros((10, 8), np.float32)
  path = tmp_path / 'R-50.pkl'
  with open(path, 'wb') as f:
    pickle.dump({'model': d2, '__author__': 'torchvision', 'matching_heuristics': True}, f, protocol=2)
  assert_trees_equal(convert_backbone(read_state_dict(path), c, shapes=shapes), want)
  del d2['res2.0.conv1.weight']
  with pytest.raises(CheckpointError, match=r'missing keys:\n    backbone.res2.0.conv1.weight'):
    convert_backbone(d2, c, source=str(path), shapes=shapes)
