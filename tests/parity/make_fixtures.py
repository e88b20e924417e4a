r"""Regenerate tests/parity/fixtures from the official DI-MaskDINO code on a CPU (run by hand; the tests never run it).

  python -m tests.parity.make_fixtures --official /path/to/DI-MaskDINO --detectron2 /path/to/detectron2 \
      --out tests/parity/fixtures

--official is a checkout of github.com/CQU-ADHRI-Lab/DI-MaskDINO, --detectron2 one of
github.com/facebookresearch/detectron2 (only its pure-Python files are loaded: the ResNet, FrozenBatchNorm2d, Conv2d,
ImageList, Boxes, Instances, sem_seg_postprocess). Neither is installed or copied into this project: their modules
are loaded from those paths with small stand-ins for what needs compiled code or packages we do not have (fvcore's
init helpers, the registries, `configurable`, torchvision's box_area, the deformable-attention CUDA op, whose absence
makes the official MSDeformAttn take its grid_sample fallback) and with `.cuda()` made a no-op (reference section 12).

What it writes (see fixture_io.py for the configuration and the weight encoding):
  state_dict.npz  the official model's state_dict (every parameter random, FrozenBN statistics random)
  stages.npz      the input images and the official outputs of every stage (names in STAGES of test_parity.py)
  meta.json       versions, commits, seed, configuration
  maskdino_r50_predictor_keys.json  (with --maskdino) MaskDINO's R50 predictor keys and shapes
"""

import argparse
import functools
import importlib
import json
import os
import subprocess
import sys
import types
import warnings

import numpy as np
import torch
from torch import nn

from tests.parity.fixture_io import CANVAS, IMAGES, PARITY, QUANTIZE_MIN, SEED, encode_state_dict, on_grid


# ------------------------------------------------------------------------------------------------ stand-ins
class Cfg(dict):
  """A nested attribute dict: the only keys the official from_config methods read."""

  def __getattr__(self, name):
    try:
      return self[name]
    except KeyError as e:
      raise AttributeError(name) from e


def _configurable(init):
  @functools.wraps(init)
  def wrapped(self, *args, **kwargs):
    if args and isinstance(args[0], Cfg):
      init(self, **type(self).from_config(*args, **kwargs))
    else:
      init(self, *args, **kwargs)

  return wrapped


class _Registry:
  def __init__(self, name):
    self._obj = {}

  def register(self, obj=None):
    if obj is None:
      return lambda o: self.register(o)
    self._obj[obj.__name__] = obj
    return obj

  def get(self, name):
    return self._obj[name]


def _package(name, path=None, **attrs):
  mod = types.ModuleType(name)
  mod.__path__ = [path] if path else []
  mod.__dict__.update(attrs)
  sys.modules[name] = mod
  return mod


def _c2_fill(module, kaiming):  # fvcore's c2_xavier_fill / c2_msra_fill (values are overwritten anyway)
  if kaiming:
    nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
  else:
    nn.init.kaiming_uniform_(module.weight, a=1)
  if module.bias is not None:
    nn.init.constant_(module.bias, 0)


def install_shims(official, d2root):
  """Makes `import dimaskdino...` and `import detectron2...` load the given checkouts' files (without their
  __init__ files, which import most of detectron2) with stand-ins for the compiled / missing parts."""
  fv = _package('fvcore')
  fv.nn = _package('fvcore.nn')
  fv.nn.weight_init = _package(
    'fvcore.nn.weight_init',
    c2_xavier_fill=lambda m: _c2_fill(m, False),
    c2_msra_fill=lambda m: _c2_fill(m, True),
  )
  fv.nn.distributed = _package('fvcore.nn.distributed', differentiable_all_reduce=lambda x: x)
  d2 = os.path.join(d2root, 'detectron2')
  _package('detectron2', d2)
  _package('detectron2.utils', os.path.join(d2, 'utils'))
  _package('detectron2.utils.registry', Registry=_Registry)
  _package('detectron2.config', configurable=_configurable)
  layers = _package('detectron2.layers', os.path.join(d2, 'layers'))
  wrappers = importlib.import_module('detectron2.layers.wrappers')
  layers.ShapeSpec = importlib.import_module('detectron2.layers.shape_spec').ShapeSpec
  layers.Conv2d, layers.move_device_like, layers.shapes_to_tensor = (
    wrappers.Conv2d,
    wrappers.move_device_like,
    wrappers.shapes_to_tensor,
  )
  bn = importlib.import_module('detectron2.layers.batch_norm')
  layers.get_norm, layers.FrozenBatchNorm2d = bn.get_norm, bn.FrozenBatchNorm2d
  layers.CNNBlockBase = importlib.import_module('detectron2.layers.blocks').CNNBlockBase
  layers.DeformConv = layers.ModulatedDeformConv = None
  modeling = _package('detectron2.modeling', os.path.join(d2, 'modeling'))
  backbone = _package('detectron2.modeling.backbone', os.path.join(d2, 'modeling', 'backbone'))
  resnet = importlib.import_module('detectron2.modeling.backbone.resnet')
  backbone.Backbone = importlib.import_module('detectron2.modeling.backbone.backbone').Backbone
  modeling.SEM_SEG_HEADS_REGISTRY = _Registry('SEM_SEG_HEADS')
  modeling.META_ARCH_REGISTRY = _Registry('META_ARCH')
  modeling.build_backbone = modeling.build_sem_seg_head = None
  structures = _package('detectron2.structures', os.path.join(d2, 'structures'))
  structures.ImageList = importlib.import_module('detectron2.structures.image_list').ImageList
  structures.Boxes = importlib.import_module('detectron2.structures.boxes').Boxes
  structures.Instances = importlib.import_module('detectron2.structures.instances').Instances
  structures.BitMasks = structures.ROIMasks = None  # only the 'bitmask' box init and paste-masks paths use them
  importlib.import_module('detectron2.modeling.postprocessing')
  importlib.import_module('detectron2.utils.memory')
  _package('detectron2.data', MetadataCatalog=None)

  def box_area(boxes):
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])

  tv = _package('torchvision')
  tv.ops = _package('torchvision.ops')
  tv.ops.boxes = _package('torchvision.ops.boxes', box_area=box_area)
  _package('MultiScaleDeformableAttention')  # no compiled op: MSDeformAttn falls back to grid_sample
  torch.Tensor.cuda = lambda self, *a, **k: self  # the DI decoder calls .cuda() in the mask2box path

  pkg = os.path.join(official, 'dimaskdino')
  _package('dimaskdino', pkg)
  _package('dimaskdino.modeling', os.path.join(pkg, 'modeling'))
  _package('dimaskdino.modeling.meta_arch', os.path.join(pkg, 'modeling', 'meta_arch'))
  _package('dimaskdino.modeling.criterion', SetCriterion=None)  # losses are not part of these fixtures
  _package('dimaskdino.modeling.matcher', HungarianMatcher=None)
  head = importlib.import_module('dimaskdino.modeling.meta_arch.maskdino_head')
  importlib.import_module('dimaskdino.modeling.pixel_decoder.maskdino_encoder')  # registers MaskDINOEncoder
  meta = importlib.import_module('dimaskdino.maskdino')
  return resnet, head, meta


# ------------------------------------------------------------------------------------------------ the model
def official_cfg(p=PARITY):
  """The official cfg for a configuration dict like fixture_io.PARITY (fixture_io.FULL: the R50 COCO model)."""
  return Cfg(
    MODEL=Cfg(
      BACKBONE=Cfg(FREEZE_AT=0),
      RESNETS=Cfg(
        NORM='FrozenBN',
        STEM_OUT_CHANNELS=p['stem_width'],
        OUT_FEATURES=['res2', 'res3', 'res4', 'res5'],
        DEPTH=50,
        NUM_GROUPS=1,
        WIDTH_PER_GROUP=p['width'],
        RES2_OUT_CHANNELS=p['res2_out_channels'],
        STRIDE_IN_1X1=False,
        RES5_DILATION=1,
        DEFORM_ON_PER_STAGE=[False] * 4,
        DEFORM_MODULATED=False,
        DEFORM_NUM_GROUPS=1,
      ),
      SEM_SEG_HEAD=Cfg(
        NAME='MaskDINOHead',
        PIXEL_DECODER_NAME='MaskDINOEncoder',
        IN_FEATURES=['res2', 'res3', 'res4', 'res5'],
        DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES=['res3', 'res4', 'res5'],
        NUM_CLASSES=p['num_classes'],
        CONVS_DIM=p['hidden_dim'],
        MASK_DIM=p['hidden_dim'],
        NORM='GN',
        DIM_FEEDFORWARD=p['enc_ffn'],
        TRANSFORMER_ENC_LAYERS=p['enc_layers'],
        COMMON_STRIDE=4,
        NUM_FEATURE_LEVELS=3,
        TOTAL_NUM_FEATURE_LEVELS=4,
        FEATURE_ORDER='low2high',
        IGNORE_VALUE=255,
        LOSS_WEIGHT=1.0,
      ),
      MaskDINO=Cfg(
        TRANSFORMER_DECODER_NAME='DIMaskDINODecoder',
        DROPOUT=0.0,
        NHEADS=8,
        HIDDEN_DIM=p['hidden_dim'],
        NUM_OBJECT_QUERIES=p['k2'],
        FIRST_SELECTED_QUERIES=p['k1'],
        NUM_GUIDING_TOKENS=p['guiding_tokens'],
        DIM_FEEDFORWARD=p['dec_ffn'],
        DEC_LAYERS=p['dec_layers'],
        TI_LAYERS=p['ti_layers'],
        ENFORCE_INPUT_PROJ=False,
        TWO_STAGE=True,
        INITIALIZE_BOX_TYPE='mask2box',
        DN='seg',
        DN_NOISE_SCALE=0.4,
        DN_NUM=p['dn_num'],
        INITIAL_PRED=True,
        LEARN_TGT=False,
        SEMANTIC_CE_LOSS=False,
        TEST=Cfg(SEMANTIC_ON=False, PANOPTIC_ON=False),
      ),
    )
  )


def build_official(resnet, head, meta, p=PARITY):
  cfg = official_cfg(p)
  backbone = resnet.build_resnet_backbone(cfg, resnet.ShapeSpec(channels=3))
  sem_seg_head = head.MaskDINOHead(cfg, backbone.output_shape())
  return meta.MaskDINO(
    backbone=backbone,
    sem_seg_head=sem_seg_head,
    criterion=types.SimpleNamespace(weight_dict={}),
    num_queries=p['k2'],
    object_mask_threshold=0.25,
    overlap_threshold=0.8,
    metadata=None,
    size_divisibility=32,
    sem_seg_postprocess_before_inference=True,
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
    semantic_on=False,
    panoptic_on=False,
    instance_on=True,
    test_topk_per_image=p['detections_per_image'],
    data_loader='coco_instance_lsj',
    pano_temp=0.06,
    focus_on_box=False,
    transform_eval=True,
    semantic_ce_loss=False,
  )


def randomize(model, rng):
  """Every parameter random (big weights on the 4-level grid of fixture_io), FrozenBN statistics random."""
  with torch.no_grad():
    for name, p in model.named_parameters():  # shared modules are listed once
      shape = tuple(p.shape)
      if p.dim() >= 2:
        fan_in = int(np.prod(shape[1:])) if 'level_embed' not in name else 1
        gain = 2.0 if name.startswith('backbone.') else 1.0
        std = float(np.sqrt(gain / fan_in))
        if p.numel() >= QUANTIZE_MIN:
          value = on_grid(rng, shape, std)
        else:
          value = (rng.standard_normal(shape) * std).astype(np.float32)
      elif name.endswith('weight'):  # LayerNorm / GroupNorm scales
        value = rng.uniform(0.5, 1.5, shape).astype(np.float32)
      else:  # biases: around the initial value (the sampling-offset bias keeps its direction grid)
        value = (p.numpy() + 0.2 * rng.standard_normal(shape)).astype(np.float32)
      p.copy_(torch.from_numpy(value))
    for name, b in model.named_buffers():
      if name.endswith('running_mean'):
        b.copy_(torch.from_numpy((0.2 * rng.standard_normal(b.shape)).astype(np.float32)))
      elif name.endswith('running_var'):
        b.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, b.shape).astype(np.float32)))
      elif name.startswith('backbone.') and name.endswith('weight'):
        b.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, b.shape).astype(np.float32)))
      elif name.startswith('backbone.') and name.endswith('bias'):
        b.copy_(torch.from_numpy((0.2 * rng.standard_normal(b.shape)).astype(np.float32)))


# ------------------------------------------------------------------------------------------------ running it
def _np(x):
  return x.detach().float().numpy().copy()


def run(model, images, specs=IMAGES):
  """Eval forward of the meta-architecture (post-processing included) with hooks on every stage, then the
  predictor once more in training mode without DN (which computes masks for every prediction). Returns
  {name: array} (layouts noted per entry, NCHW maps moved to NHWC)."""
  predictor = model.sem_seg_head.predictor
  pixel_decoder = model.sem_seg_head.pixel_decoder
  got = {}
  hooks = [
    model.backbone.register_forward_hook(lambda m, i, o: got.__setitem__('backbone', o)),
    pixel_decoder.transformer.register_forward_hook(lambda m, i, o: got.__setitem__('encoder', o[0])),
    predictor.oldm.register_forward_pre_hook(lambda m, a: got.__setitem__('oldm_in', a)),
    predictor.oldm.register_forward_hook(lambda m, i, o: got.__setitem__('oldm_out', o)),
    predictor.query_guide_feature_update.register_forward_hook(lambda m, i, o: got.__setitem__('bato_memory', o)),
    predictor.decoder.mask_output_conv.register_forward_hook(lambda m, i, o: got.__setitem__('bato_mf', o)),
    predictor.register_forward_hook(lambda m, i, o: None if 'predictor_eval' in got else got.update(predictor_eval=o)),
  ]
  forward_features = pixel_decoder.forward_features

  def capture_features(*a, **k):
    out = forward_features(*a, **k)
    got['pixel_decoder'] = out
    return out

  pixel_decoder.forward_features = capture_features
  batched = []
  for img, spec in zip(images, specs):
    h, w = spec['image_hw']
    chw = torch.from_numpy(np.ascontiguousarray(img[:h, :w].transpose(2, 0, 1))).float()
    batched.append({'image': chw, 'height': spec['orig_hw'][0], 'width': spec['orig_hw'][1]})
  model.eval()
  with torch.no_grad():
    results = model(batched)
    features = got['backbone']
    predictor.train()
    predictor.dn = 'no'
    outputs, _ = model.sem_seg_head(features)
    predictor.eval()
  for h in hooks:
    h.remove()
  pixel_decoder.forward_features = forward_features

  s = {}
  for k, v in features.items():
    s[f'backbone_{k}'] = _np(v.permute(0, 2, 3, 1))  # (B, H, W, C)
  s['encoder_tokens'] = _np(got['encoder'])  # (B, S, 256), encoder level order [1/8 .. 1/64]
  # Mask-feature maps keep every 4th channel (64 of 256) to keep the fixture small; all channels enter the masks.
  s['mask_features'] = _np(got['pixel_decoder'][0].permute(0, 2, 3, 1))[..., ::4]  # (B, Hm, Wm, 64)
  inter = outputs['interm_outputs']
  s['interm_logits'] = _np(inter['pred_logits'])  # (B, k1, C) of the selected tokens, in selection order
  s['interm_boxes'] = _np(inter['pred_boxes'])  # (B, k1, 4)
  s['interm_masks'] = _np(inter['pred_masks'])  # (B, k1, Hm, Wm)
  s['mask2box_anchors'] = _np(got['oldm_in'][1].transpose(0, 1))  # (B, k1, 4) unsigmoided
  q_bal, q_bal_ref, _, _ = got['oldm_out']
  s['q_bal'] = _np(q_bal)  # (B, k2, 256) content of the decoder queries
  s['q_bal_boxes'] = _np(q_bal_ref)  # (B, k2, 4) sigmoid boxes of the decoder queries
  s['di_logits'] = np.stack([_np(o['pred_logits']) for o in outputs['oldm_outputs']])  # (T, B, k1, C)
  s['di_boxes'] = np.stack([_np(o['pred_boxes']) for o in outputs['oldm_outputs']])  # (T, B, k1, 4)
  s['bato_memory'] = _np(got['bato_memory'].transpose(0, 1))  # (B, S, 256), decoder level order [1/64 .. 1/8]
  s['bato_mask_features'] = _np(got['bato_mf'].permute(0, 2, 3, 1))[..., ::4]  # (B, Hm, Wm, 64)
  entries = outputs['aux_outputs'] + [outputs]  # initial prediction, decoder layers 0 .. L-1
  s['layer_logits'] = np.stack([_np(o['pred_logits']) for o in entries])  # (L + 1, B, k2, C)
  s['layer_boxes'] = np.stack([_np(o['pred_boxes']) for o in entries])  # (L + 1, B, k2, 4)
  s['layer_masks'] = np.stack([_np(o['pred_masks']) for o in entries])  # (L + 1, B, k2, Hm, Wm)
  for i, r in enumerate(results):
    inst = r['instances']
    s[f'final_{i}_scores'] = _np(inst.scores)  # (k,) unsorted (official topk(sorted=False))
    s[f'final_{i}_labels'] = inst.pred_classes.numpy().astype(np.int64)
    s[f'final_{i}_boxes'] = _np(inst.pred_boxes.tensor)  # (k, 4) xyxy in original-image pixels
    masks = inst.pred_masks.numpy() > 0.5  # (k, orig_h, orig_w)
    s[f'final_{i}_masks'] = np.packbits(masks.reshape(-1))
    s[f'final_{i}_masks_shape'] = np.asarray(masks.shape, np.int64)
  # The eval-mode pass (post-processed above) and the training-mode pass must agree on the final prediction.
  eval_out = got['predictor_eval'][0]
  for key, stage in (('pred_logits', 'layer_logits'), ('pred_boxes', 'layer_boxes'), ('pred_masks', 'layer_masks')):
    if not np.array_equal(_np(eval_out[key]), s[stage][-1]):
      raise AssertionError(f'eval and training-mode passes differ in {key}')
  return s


def write_maskdino_keys(maskdino, out, commit=None):
  """maskdino_r50_predictor_keys.json: {key: shape} of MaskDINO's R50 instance predictor (9 decoder layers, 300
  queries, 80 classes, FFN 2048; its backbone and pixel decoder are the ones DI-MaskDINO's fixtures cover)."""
  pkg = os.path.join(maskdino, 'maskdino')
  _package('maskdino', pkg)
  _package('maskdino.modeling', os.path.join(pkg, 'modeling'))
  decoder = importlib.import_module('maskdino.modeling.transformer_decoder.maskdino_decoder')
  cfg = official_cfg()
  cfg.MODEL.MaskDINO.update(TRANSFORMER_DECODER_NAME='MaskDINODecoder', DEC_LAYERS=9, NUM_OBJECT_QUERIES=300)
  cfg.MODEL.MaskDINO.update(DIM_FEEDFORWARD=2048)
  cfg.MODEL.SEM_SEG_HEAD.update(NUM_CLASSES=80)
  model = decoder.MaskDINODecoder(cfg, 256, True)
  keys = {'sem_seg_head.predictor.' + k: list(v.shape) for k, v in model.state_dict().items()}
  info = {'maskdino_commit': commit or _git(maskdino), 'keys': keys}
  with open(os.path.join(out, 'maskdino_r50_predictor_keys.json'), 'w') as f:
    json.dump(info, f, indent=0, sort_keys=True)


def _git(path):
  try:
    return subprocess.check_output(['git', '-C', path, 'rev-parse', 'HEAD'], text=True).strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--official', required=True, help='DI-MaskDINO checkout (holds dimaskdino/)')
  parser.add_argument('--detectron2', required=True, help='detectron2 checkout (holds detectron2/)')
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'fixtures'))
  parser.add_argument('--official-commit', default=None, help='commit of --official (default: git rev-parse)')
  parser.add_argument('--detectron2-commit', default=None, help='commit of --detectron2 (default: git rev-parse)')
  parser.add_argument('--maskdino', default=None, help='MaskDINO checkout: also write its R50 predictor keys')
  parser.add_argument('--maskdino-commit', default=None, help='commit of --maskdino (default: git rev-parse)')
  args = parser.parse_args(argv)
  warnings.filterwarnings('ignore', category=FutureWarning)  # torch.cuda.amp.autocast in the official code
  torch.manual_seed(SEED)
  torch.set_num_threads(1)
  rng = np.random.default_rng(SEED)
  resnet, head, meta = install_shims(os.path.abspath(args.official), os.path.abspath(args.detectron2))
  model = build_official(resnet, head, meta)
  randomize(model, rng)
  # (B, H, W, 3) uint8 RGB on the common canvas; pixels outside each image's size are not used.
  images = rng.integers(0, 256, size=(len(IMAGES), *CANVAS, 3), dtype=np.uint8)
  for img, spec in zip(images, IMAGES):
    h, w = spec['image_hw']
    img[h:], img[:, w:] = 0, 0
  stages = run(model, images)
  stages['images'] = images
  sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  os.makedirs(args.out, exist_ok=True)
  np.savez_compressed(os.path.join(args.out, 'state_dict.npz'), **encode_state_dict(sd))
  np.savez_compressed(os.path.join(args.out, 'stages.npz'), **stages)
  meta_info = {
    'official': 'github.com/CQU-ADHRI-Lab/DI-MaskDINO',
    'official_commit': args.official_commit or _git(args.official),
    'detectron2_commit': args.detectron2_commit or _git(args.detectron2),
    'torch': torch.__version__,
    'numpy': np.__version__,
    'python': sys.version.split()[0],
    'seed': SEED,
    'threads': 1,
    'parity': PARITY,
    'images': IMAGES,
    'canvas': CANVAS,
    'state_dict_keys': len(sd),
  }
  with open(os.path.join(args.out, 'meta.json'), 'w') as f:
    json.dump(meta_info, f, indent=2, sort_keys=True)
  if args.maskdino:
    write_maskdino_keys(os.path.abspath(args.maskdino), args.out, args.maskdino_commit)
  sizes = {n: os.path.getsize(os.path.join(args.out, n)) for n in ('state_dict.npz', 'stages.npz', 'meta.json')}
  print(f'wrote {args.out}: {len(sd)} state_dict keys, {len(stages)} stage arrays, sizes {sizes}')


if __name__ == '__main__':
  main()
