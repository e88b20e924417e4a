"""A tiny DI-MaskDINO that trains on 2 CPU cores on the synthetic shapes dataset (the embedded default).

Same architecture as the R50 config (DI, BATO, DN, two-stage selection, mask2box), scaled down: ResNet-18 at
quarter width, hidden 64, 2 encoder / 3 decoder layers, 4 feature levels, 128 x 128 canvas, k1 = 60, k2 = 20.
`python train.py --config configs/shapes.py --workdir runs/shapes` writes and prepares the dataset if missing.
"""

from configs import dimaskdino_r50_coco


def get_config(arg=None):
  del arg
  c = dimaskdino_r50_coco.get_config('12ep')
  c.name = 'shapes'
  m = c.model
  m.num_classes = 3  # circle, square, triangle
  m.hidden_dim = 64  # transformer width
  m.backbone.depth = 18  # BasicBlock ResNet
  m.backbone.stem_width = 16  # stem channels
  m.backbone.width = 16  # res2 width; res3..res5 = 32, 64, 128
  m.backbone.res2_out_channels = 16  # BasicBlock: res2 out = width
  m.backbone.norm = 'GN'  # trained from scratch: learned GroupNorm instead of FrozenBN (detectron2 NORM='GN')
  m.backbone.norm_groups = 8
  m.class_prior_prob = 0.01  # focal prior bias: a stable start from scratch
  m.encoder.num_layers = 2
  m.encoder.ffn_dim = 256
  m.encoder.num_heads = 4
  m.encoder.num_groups = 16  # GroupNorm groups (channels must divide)
  m.decoder.num_layers = 3
  m.decoder.ffn_dim = 256
  m.decoder.num_heads = 4
  m.decoder.num_queries = 20  # k2
  # Anchors from the encoder's predicted boxes (MaskDINO's INITIALIZE_BOX_TYPE 'no'): from scratch the interm
  # masks start empty or full, mask2box anchors degenerate to corner / whole-image boxes and the matched box
  # loss rises for the first hundreds of steps (measured; tests/training/test_trainer.py).
  m.decoder.box_init = 'none'
  m.di.selection_ks = (60, 20)  # (k1, k2)
  m.bato.num_guiding_tokens = 10
  m.dn.num = 30  # DN slots

  # Mask losses and mask matching costs at every pixel of the 32 x 32 mask maps (num_points = 0) instead of the
  # official importance-sampled points (the R50 config samples 12544 of 65536 pixels): on maps this small every
  # pixel costs less than sampling (no gathers, no top-k), and AP after 600 steps was the same (BENCHMARKS.md).
  c.loss.num_points = 0
  c.matcher.num_points = 0
  # Focal alpha (the class loss and the matcher's class cost; the official 0.25 weighs a positive class target by
  # 0.25 and a negative one by 0.75, balanced for COCO's 80 classes): with 3 classes, 0.75 learned faster. At 1500
  # steps: 0.25 -> AP 30.3 / 32.1, 0.5 -> 31.9 / 36.3 and 32.3 / 34.0 (seeds 0, 1), 0.75 -> 33.6 / 36.7 and
  # 37.5 / 38.3; at the demo's 3000 steps +0.9 box / +2.2 mask over two seeds (BENCHMARKS.md, session 21).
  c.loss.focal_alpha = 0.75

  o = c.optim
  o.lr = 1e-3  # a tiny model trained from scratch learns faster with a larger lr
  o.backbone_multiplier = 1.0  # no ImageNet init: the backbone learns at the full rate
  o.clip_norm = 0.1
  # One drop late: the loss keeps falling at lr 1e-3 until the end and the low-lr phase gains what it gains
  # within ~200 steps (3300 steps: drop at 2805 -> AP 52.9 / 50.2, at 3100 -> 54.2 / 52.1; BENCHMARKS.md).
  # 3000 steps with the drop at the same fraction (2818) on two host devices: 53.5 / 53.5 (3300: 54.4 / 54.0).
  o.lr_drop_steps = (2818,)
  o.warmup_steps = 50
  o.warmup_factor = 0.1

  t = c.train
  t.num_steps = 3000  # ~0.2 s per step on the idle 2-core development CPU, two host devices (BENCHMARKS.md)
  t.batch_size = 8
  t.log_every = 50
  t.checkpoint_every = 1000
  t.keep_checkpoints = 2

  d = c.data
  d.name = 'shapes'
  d.data_dir = 'data_cache'  # the dataset is generated here on first use
  d.train_transform = 'resize'
  d.image_size = 128
  d.random_flip = True
  d.max_instances = 8
  d.mask_stride = 1
  d.num_workers = 0
  d.test_short_edge = 128
  d.test_max_size = 128
  d.eval_canvases = ((128, 128),)

  c.eval.batch_size = 16
  return c
