r"""Regenerate tests/parity/fixtures from the official DI-MaskDINO code on a CPU (run by hand; the tests never run it).

  python -m tests.parity.make_fixtures --official /path/to/DI-MaskDINO --detectron2 /path/to/detectron2 \
      --out tests/parity/fixtures

--official is a checkout of github.com/CQU-ADHRI-Lab/DI-MaskDINO, --detectron2 one of
github.com/facebookresearch/detectron2 (only its pure-Python files are loaded: the ResNet, FrozenBatchNorm2d, Conv2d,
ImageList, Boxes, Instances, sem_seg_postprocess). Neither is installed or copied into this project: their modules
are loaded from those paths with small stand-ins for what needs compiled code or packages we do not have (fvcore's
init helpers, the registries, `configurable`, torchvision's box_area, the deformable-attention CUDA op, whose absence
makes the official MSDeformAttn take its grid_sample fallback) and with `.cuda()` made a no-op
(docs/official_vs_paper.md).

What it writes (see fixture_io.py for the configuration and the weight encoding):
  state_dict.npz  the official model's state_dict (every parameter random, FrozenBN statistics random)
  stages.npz      the input images and the official outputs of every stage (names in STAGES of test_parity.py)
  meta.json       versions, commits, seed, configuration
  maskdino_r50_predictor_keys.json  (with --maskdino) MaskDINO's R50 predictor keys and shapes
  train.npz, train.json  (unless --no-training) one official training step on a 3-image batch (3, 0, 2 instances):
                  the recorded random draws in our layouts, DN queries, matchings and cost matrices, every loss
                  term, gradient norms of every parameter and a few whole gradients, one AdamW step (run_training)
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


# ------------------------------------------------------------------------------------------------ training
# The training batch: 3 images on the common canvas with 3, 0 and 2 instances (an image without any).
TRAIN_IMAGES = ((64, 96), (52, 80), (48, 64))
TRAIN_INSTANCES = (3, 0, 2)
TRAIN_SEED = SEED + 22
# Point counts of the training fixtures (the official TRAIN_NUM_POINTS = 112 * 112 would make MBs of draws).
TRAIN_POINTS = dict(num_points=100, oversample_ratio=3.0, importance_sample_ratio=0.75)
# The official loss weights and matcher costs (DI-MaskDINO config.py defaults; the same on our side).
TRAIN_WEIGHTS = dict(class_weight=4.0, mask_weight=5.0, dice_weight=5.0, box_weight=5.0, giou_weight=2.0)
# The optimizer of the official configs (dimaskdino_r50_4scale_bs16_*.yaml SOLVER, train_net.build_optimizer).
TRAIN_OPTIM = dict(lr=1e-4, weight_decay=0.05, backbone_multiplier=0.1, clip_norm=0.01)
# Whole gradient tensors stored (besides every parameter's gradient norm); the first three also their update.
GRAD_TENSORS = (
  'sem_seg_head.predictor.class_embed.weight',
  'sem_seg_head.predictor.decoder.layers.0.cross_attn.sampling_offsets.weight',
  'backbone.res5.2.conv2.weight',
  'sem_seg_head.predictor.decoder.layers.0.cross_attn.attention_weights.weight',
  'sem_seg_head.predictor.oldm.layers.0.self_attn.out_proj.weight',
  'sem_seg_head.predictor.oldm.layers.0.linear1.weight',
  'sem_seg_head.predictor.query_guide_feature_update.multihead_attn.out_proj.weight',
  'sem_seg_head.predictor.query_guide_feature_update.linear1.weight',
)
UPDATE_TENSORS = GRAD_TENSORS[:3]


def install_training_shims(official, d2root):
  """After install_shims: the official SetCriterion and HungarianMatcher (replacing their stand-ins) with
  detectron2's PointRend point_features, a single-process `comm`, and `.to('cuda')` made a no-op (DN building)."""
  import importlib.util

  _package('detectron2.utils.comm', get_world_size=lambda: 1)
  _package('detectron2.projects', os.path.join(d2root, 'projects'))
  _package('detectron2.projects.point_rend', os.path.join(d2root, 'projects', 'PointRend', 'point_rend'))
  name = 'detectron2.projects.point_rend.point_features'
  path = os.path.join(d2root, 'projects', 'PointRend', 'point_rend', 'point_features.py')
  layers = sys.modules['detectron2.layers']
  layers.cat = importlib.import_module('detectron2.layers.wrappers').cat
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  sys.modules[name] = mod
  spec.loader.exec_module(mod)
  sys.modules['torchvision']._is_tracing = lambda: False
  to = torch.Tensor.to
  torch.Tensor.to = (
    lambda self, *a, **k: self if a and isinstance(a[0], str) and a[0].startswith('cuda') else to(self, *a, **k)
  )
  pkg = os.path.join(official, 'dimaskdino')
  _package('dimaskdino.utils', os.path.join(pkg, 'utils'))
  for m in ('dimaskdino.modeling.criterion', 'dimaskdino.modeling.matcher'):
    sys.modules.pop(m, None)
  criterion = importlib.import_module('dimaskdino.modeling.criterion')
  matcher = importlib.import_module('dimaskdino.modeling.matcher')
  return criterion, matcher


def official_weight_dict(dec_layers, ti_layers):
  """The criterion's weight_dict as MaskDINO.from_config builds it (two-stage, DN 'seg', deep supervision)."""
  w = TRAIN_WEIGHTS
  base = {
    'loss_ce': w['class_weight'],
    'loss_mask': w['mask_weight'],
    'loss_dice': w['dice_weight'],
    'loss_bbox': w['box_weight'],
    'loss_giou': w['giou_weight'],
  }
  out = dict(base)
  out.update({k + '_interm': v for k, v in base.items()})
  out.update({k + '_dn': v for k, v in list(out.items())})
  for i in range(dec_layers):
    out.update({k + f'_{i}': v for k, v in list(out.items()) if not k[-1].isdigit()})
  for i in range(ti_layers):
    out.update({'oldm_' + k + f'_{i}': v for k, v in list(out.items()) if not k.startswith('oldm_')})
  return out


def training_batch(rng):
  """(images (B, H, W, 3) uint8 on the canvas, per image: labels (n,), masks (n, H, W) bool on the canvas)."""
  images = rng.integers(0, 256, size=(len(TRAIN_IMAGES), *CANVAS, 3), dtype=np.uint8)
  gts = []
  for img, (h, w), n in zip(images, TRAIN_IMAGES, TRAIN_INSTANCES):
    img[h:], img[:, w:] = 0, 0
    yy, xx = np.mgrid[: CANVAS[0], : CANVAS[1]]
    masks = np.zeros((n, *CANVAS), bool)
    for j in range(n):  # an ellipse inside the image
      cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w
      ry, rx = rng.uniform(0.1, 0.35) * h, rng.uniform(0.1, 0.35) * w
      masks[j] = ((yy + 0.5 - cy) / ry) ** 2 + ((xx + 0.5 - cx) / rx) ** 2 <= 1
    gts.append((rng.integers(0, PARITY['num_classes'], size=n), masks))
  return images, gts


class _Recorder:
  """Records the official code's random draws (torch.rand / rand_like / randint_like), in call order."""

  def __init__(self):
    self.draws = []
    self._orig = {}

  def __enter__(self):
    for name in ('rand', 'rand_like', 'randint_like'):
      orig = getattr(torch, name)
      self._orig[name] = orig

      def wrapped(*a, _orig=orig, _name=name, **k):
        out = _orig(*a, **k)
        self.draws.append((_name, out.detach().clone()))
        return out

      setattr(torch, name, wrapped)
    return self

  def __exit__(self, *exc):
    for name, orig in self._orig.items():
      setattr(torch, name, orig)


def run_training(model, criterion_mod, matcher_mod):
  """One official training step on the training batch: DN queries, matchings (with cost matrices), every loss
  term, the gradient of the weighted total and one AdamW step. Returns {name: array} (our layouts) and a JSON-able
  dict (parameter names, term names, weights)."""
  p = PARITY
  rng = np.random.default_rng(TRAIN_SEED)
  torch.manual_seed(TRAIN_SEED)
  images, gts = training_batch(rng)
  instances = sys.modules['detectron2.structures'].Instances
  boxes_cls = sys.modules['detectron2.structures'].Boxes
  batched = []
  for img, (h, w), (labels, masks) in zip(images, TRAIN_IMAGES, gts):
    chw = torch.from_numpy(np.ascontiguousarray(img[:h, :w].transpose(2, 0, 1))).float()
    inst = instances((h, w))
    m = torch.from_numpy(masks[:, :h, :w].copy())
    xyxy = np.zeros((len(labels), 4), np.float32)
    for j, mk in enumerate(masks):
      ys, xs = np.nonzero(mk)
      xyxy[j] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    inst.gt_boxes = boxes_cls(torch.from_numpy(xyxy))
    inst.gt_classes = torch.from_numpy(labels.astype(np.int64))
    inst.gt_masks = m
    batched.append({'image': chw, 'instances': inst, 'height': h, 'width': w})

  weight_dict = official_weight_dict(p['dec_layers'], p['ti_layers'])
  matcher = matcher_mod.HungarianMatcher(
    cost_class=4.0, cost_mask=5.0, cost_dice=5.0, cost_box=5.0, cost_giou=2.0, num_points=TRAIN_POINTS['num_points']
  )
  criterion = criterion_mod.SetCriterion(
    p['num_classes'],
    matcher=matcher,
    weight_dict=weight_dict,
    eos_coef=0.1,
    losses=['labels', 'masks', 'boxes'],
    num_points=TRAIN_POINTS['num_points'],
    oversample_ratio=TRAIN_POINTS['oversample_ratio'],
    importance_sample_ratio=TRAIN_POINTS['importance_sample_ratio'],
    dn='seg',
    dn_losses=['labels', 'masks', 'boxes'],
  )
  model.criterion = criterion
  predictor = model.sem_seg_head.predictor
  predictor.dn = 'seg'
  events = []  # ('match', indices, costs) / ('mask', indices, (start, end) of the draws)
  rec = _Recorder()
  lsa = matcher_mod.linear_sum_assignment
  costs = []

  def lsa_recorded(c):
    costs.append(np.asarray(c, np.float32).copy())
    return lsa(c)

  matcher_mod.linear_sum_assignment = lsa_recorded
  match_fwd = matcher.memory_efficient_forward

  def match_recorded(outputs, targets, cost=('cls', 'box', 'mask')):
    costs.clear()
    indices = match_fwd(outputs, targets, cost=list(cost))
    events.append(('match', [(i.numpy(), j.numpy()) for i, j in indices], list(costs)))
    return indices

  matcher.memory_efficient_forward = match_recorded
  loss_masks = criterion.loss_masks

  def masks_recorded(outputs, targets, indices, num_masks):
    start = len(rec.draws)
    out = loss_masks(outputs, targets, indices, num_masks)
    events.append(('mask', [(i.cpu().numpy(), j.cpu().numpy()) for i, j in indices], (start, len(rec.draws))))
    return out

  criterion.loss_masks = masks_recorded
  crit_fwd = criterion.forward
  got = {}

  def crit_recorded(outputs, targets, mask_dict=None):
    losses = crit_fwd(outputs, targets, mask_dict)
    got['terms'] = {k: float(v) for k, v in losses.items()}
    got['mask_dict'] = mask_dict
    return losses

  criterion.forward = crit_recorded
  prep = predictor.prepare_for_dn

  def prep_recorded(*a, **k):
    out = prep(*a, **k)
    got['dn'] = out
    return out

  predictor.prepare_for_dn = prep_recorded
  model.train()
  model.zero_grad()
  with rec:
    weighted = model(batched)
  total = sum(weighted.values())
  total.backward()
  model.eval()

  s = {'train_images': images}
  b, g, s_dn = len(images), max(TRAIN_INSTANCES), p['dn_num']
  n = np.asarray(TRAIN_INSTANCES)
  labels = np.zeros((b, g), np.int32)
  valid = np.zeros((b, g), bool)
  gt_masks = np.zeros((b, g, *CANVAS), bool)
  for i, (lab, mk) in enumerate(gts):
    labels[i, : len(lab)], valid[i, : len(lab)], gt_masks[i, : len(lab)] = lab, True, mk
  boxes = np.zeros((b, g, 4), np.float32)
  mask_dict = got['mask_dict']
  for i, t in enumerate(model.prepare_targets([x['instances'] for x in batched], _image_list(model, batched))):
    boxes[i, : len(t['boxes'])] = t['boxes'].numpy()
  s.update(train_labels=labels, train_valid=valid, train_boxes=boxes, train_masks=np.packbits(gt_masks.reshape(-1)))

  # DN: the draws over the concatenated known GT (group-major, image, GT) -> our (B, S) slots.
  scalar, pad = mask_dict['scalar'], mask_dict['pad_size']
  single = pad // scalar
  (n1, p_flip), (n2, new_label), (n3, u_box) = rec.draws[:3]
  assert (n1, n2, n3) == ('rand_like', 'randint_like', 'rand_like'), (n1, n2, n3)
  flip = (p_flip < 0.4 * 0.5).numpy()
  classes = np.zeros(len(flip), np.int64)
  classes[np.nonzero(flip)[0]] = new_label.numpy()
  box = (u_box * 2 - 1.0).numpy()
  offsets = np.concatenate([[0], np.cumsum(n)])
  dn_flip = np.zeros((b, s_dn), bool)
  dn_classes = np.zeros((b, s_dn), np.int32)
  dn_box = np.zeros((b, s_dn, 4), np.float32)
  for grp in range(scalar):
    for i in range(b):
      for j in range(n[i]):
        e = grp * offsets[-1] + offsets[i] + j
        slot = grp * single + j
        dn_flip[i, slot], dn_classes[i, slot], dn_box[i, slot] = flip[e], classes[e], box[e]
  s.update(train_dn_flip=dn_flip, train_dn_classes=dn_classes, train_dn_box=dn_box)
  label_q, bbox_q, attn_mask, _ = got['dn']
  s['train_dn_content'] = _np(label_q[:, :pad])  # (B, pad, 256)
  s['train_dn_anchors'] = _np(bbox_q[:, :pad])  # (B, pad, 4) logit space
  s['train_dn_attn_mask'] = attn_mask.numpy()  # (pad + Q, pad + Q) True = blocked
  s['train_dn_pad_size'] = np.asarray(pad)

  # Matchings and draws, in the official criterion's order.
  nl = p['dec_layers']
  order = ['final', 'dn'] + [f'oldm_{i}' for i in range(p['ti_layers'])]
  for i in range(nl):
    order += [f'aux_{i}', f'dn_{i}']
  order += ['interm']
  names = []
  for name in order:
    if name.startswith('dn'):
      names.append(('mask', name))
    elif name.startswith('oldm'):
      names.append(('match', name))
    else:
      names += [('match', name), ('mask', name)]
  assert [k for k, _ in names] == [e[0] for e in events], ([k for k, _ in names], [e[0] for e in events])
  cursor = 3  # after the DN draws
  pts, d = TRAIN_POINTS['num_points'], None
  q_of = {'interm': p['k1'], **{f'oldm_{i}': p['k1'] for i in range(p['ti_layers'])}}
  for (kind, name), ev in zip(names, events):
    if kind == 'match':
      indices, cost_list = ev[1], ev[2]
      q = q_of.get(name, p['k2'])
      qfg = np.full((b, g), -1, np.int32)
      cost = np.full((b, q, g), np.nan, np.float32)
      for i, (src, tgt) in enumerate(indices):
        qfg[i, tgt] = src
        cost[i, :, : n[i]] = cost_list[i].reshape(q, n[i])
      s[f'train_match_{name}'] = qfg
      s[f'train_cost_{name}'] = cost
      if not name.startswith('oldm'):
        u = []
        for _ in range(b):  # one torch.rand(1, P, 2) per image, also for an image without GT
          kind_, x = rec.draws[cursor]
          assert kind_ == 'rand' and tuple(x.shape) == (1, pts, 2), (kind_, x.shape)
          u.append(x[0].numpy())
          cursor += 1
        s[f'train_u_match_{name}'] = np.stack(u)  # (B, P, 2)
    else:
      start, end = ev[2]
      assert start == cursor and end == cursor + 2, (name, start, end, cursor)
      (_, sampled), (_, fresh) = rec.draws[start], rec.draws[start + 1]
      uni = torch.cat([sampled, fresh], 1).numpy()  # (pairs, D, 2): our uniform layout per pair
      d = uni.shape[1]
      cursor = end
      rows = s_dn if name.startswith('dn') else g
      out = np.full((b, rows, d, 2), 0.5, np.float32)
      k = 0
      for i, (src, tgt) in enumerate(ev[1]):
        for a_, t_ in zip(src, tgt):
          out[i, a_ if name.startswith('dn') else t_] = uni[k]
          k += 1
      assert k == len(uni)
      s[f'train_u_loss_{name}'] = out
  assert cursor == len(rec.draws), (cursor, len(rec.draws))

  # Loss terms (unweighted, official names), the weighted total, gradients, one AdamW step.
  terms = got['terms']
  s['train_total'] = np.asarray(float(total), np.float64)
  params = dict(model.named_parameters())
  s['train_grad_norms'] = np.asarray(
    [0.0 if v.grad is None else float(v.grad.double().norm()) for v in params.values()], np.float64
  )
  for k in GRAD_TENSORS:
    s[f'train_grad:{k}'] = _np(params[k].grad)
  before = {k: v.detach().clone() for k, v in params.items()}
  optimizer = official_optimizer(model)
  optimizer.step()
  s['train_update_norms'] = np.asarray([float((v.detach() - before[k]).double().norm()) for k, v in params.items()])
  for k in UPDATE_TENSORS:
    s[f'train_update:{k}'] = _np(params[k].detach() - before[k])
  with torch.no_grad():  # the state_dict of the fixtures stays the one before the step
    for k, v in params.items():
      v.copy_(before[k])
  info = {
    'terms': terms,
    'weight_dict': {k: weight_dict[k] for k in terms if k in weight_dict},
    'param_names': list(params),
    'dn': {'scalar': int(scalar), 'pad_size': int(pad)},
    'points': TRAIN_POINTS,
    'optim': TRAIN_OPTIM,
    'instances': TRAIN_INSTANCES,
    'image_hw': TRAIN_IMAGES,
    'seed': TRAIN_SEED,
  }
  return s, info


def _image_list(model, batched):
  images = [(x['image'] - model.pixel_mean) / model.pixel_std for x in batched]
  return sys.modules['detectron2.structures'].ImageList.from_tensors(images, model.size_divisibility)


def official_optimizer(model):
  """train_net.Trainer.build_optimizer for the official configs: one AdamW group per parameter (lr x 0.1 in modules
  named with 'backbone', no weight decay in norm layers and embeddings), full-model gradient clipping (max norm
  0.01) applied before the step (here at once)."""
  o = TRAIN_OPTIM
  norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d, nn.LocalResponseNorm)
  groups, seen = [], set()
  for module_name, module in model.named_modules():
    for name, value in module.named_parameters(recurse=False):
      if not value.requires_grad or id(value) in seen:
        continue
      seen.add(id(value))
      lr = o['lr'] * (o['backbone_multiplier'] if 'backbone' in module_name else 1.0)
      wd = o['weight_decay']
      if isinstance(module, norms) or isinstance(module, nn.Embedding):
        wd = 0.0
      if 'relative_position_bias_table' in name or 'absolute_pos_embed' in name:
        wd = 0.0
      groups.append({'params': [value], 'lr': lr, 'weight_decay': wd})
  optimizer = torch.optim.AdamW(groups, o['lr'])
  torch.nn.utils.clip_grad_norm_([p for g in groups for p in g['params']], o['clip_norm'])
  return optimizer


def write_training(model, official, d2root, out):
  """train.npz + train.json (see run_training)."""
  criterion_mod, matcher_mod = install_training_shims(official, d2root)
  arrays, info = run_training(model, criterion_mod, matcher_mod)
  np.savez_compressed(os.path.join(out, 'train.npz'), **arrays)
  with open(os.path.join(out, 'train.json'), 'w') as f:
    json.dump(info, f, indent=0, sort_keys=True)
  return os.path.getsize(os.path.join(out, 'train.npz'))


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
  parser.add_argument('--no-training', action='store_true', help='skip train.npz / train.json (training parity)')
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
  if not args.no_training:
    size = write_training(model, os.path.abspath(args.official), os.path.abspath(args.detectron2), args.out)
    print(f'wrote train.npz ({size} bytes) and train.json')
  sizes = {n: os.path.getsize(os.path.join(args.out, n)) for n in ('state_dict.npz', 'stages.npz', 'meta.json')}
  print(f'wrote {args.out}: {len(sd)} state_dict keys, {len(stages)} stage arrays, sizes {sizes}')


if __name__ == '__main__':
  main()
