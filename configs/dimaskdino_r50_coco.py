"""DI-MaskDINO, ResNet-50, COCO instance segmentation: the official reference config.

Every value follows `configs/Base_DIMaskDINO_COCO.yaml` + `dimaskdino_r50_4scale_bs16_{12,24,50}ep.yaml` of the
official code with detectron2 defaults (docs/architecture.md, "Training settings"). Variants: `12ep` (default),
`24ep`, `50ep`:

  python train.py --config configs/dimaskdino_r50_coco.py:24ep --workdir runs/r50_24ep
"""

import ml_collections

# Schedules in iterations at batch 16 (the official 12ep / 24ep / 50ep yaml files): (max_iter, lr drop steps).
SCHEDULES = {
  '12ep': (88500, (81125,)),
  '24ep': (177000, (147500,)),
  '50ep': (368750, (327778, 355092)),
}


def get_config(arg=None):
  variant = arg or '12ep'
  if variant not in SCHEDULES:
    raise ValueError(f'configs/dimaskdino_r50_coco.py: unknown variant {variant!r}; choose one of {sorted(SCHEDULES)}')
  max_iter, steps = SCHEDULES[variant]
  c = ml_collections.ConfigDict()
  c.name = f'dimaskdino_r50_coco_{variant}'
  c.seed = 0  # PRNG seed for init, data order, DN noise and point sampling

  m = c.model = ml_collections.ConfigDict()
  m.formulation = 'official'  # 'official' reproduces the official code (quirks included); 'paper' follows Eq. 1-11
  m.num_classes = 80  # SEM_SEG_HEAD.NUM_CLASSES
  m.hidden_dim = 256  # HIDDEN_DIM (= CONVS_DIM = MASK_DIM)
  m.pixel_mean = (123.675, 116.28, 103.53)  # PIXEL_MEAN, RGB, 0-255 scale
  m.pixel_std = (58.395, 57.12, 57.375)  # PIXEL_STD
  m.msda_impl = 'auto'  # deformable-attention op: 'auto' (GPU: XLA or Pallas; CPU: 'dense' on small maps, else 'xla')
  m.remat = False  # rematerialize encoder/decoder layers in the backward pass (saves memory)
  m.size_divisibility = 32  # SIZE_DIVISIBILITY: canvases must be multiples of this
  m.class_prior_prob = 0.0  # > 0: focal prior bias on class_embed (official: 0, torch's default Linear init)

  b = m.backbone = ml_collections.ConfigDict()
  b.depth = 50  # RESNETS.DEPTH
  b.stem_width = 64  # stem conv channels (d2 STEM_OUT_CHANNELS)
  b.width = 64  # bottleneck width of res2 (d2 WIDTH_PER_GROUP x NUM_GROUPS); doubles per stage
  b.res2_out_channels = 256  # RES2_OUT_CHANNELS (64 for ResNet-18/34)
  b.freeze_at = 0  # FREEZE_AT: 0 = every conv trainable (BN is always frozen)
  b.norm = 'FrozenBN'  # RESNETS.NORM: 'FrozenBN' (official) or 'GN' (learned GroupNorm, for training from scratch)
  b.norm_groups = 32  # GroupNorm groups when norm = 'GN'
  b.dtype = 'float32'  # backbone compute dtype ('bfloat16' to save memory)
  # ImageNet init for training from scratch (official: detectron2://ImageNetPretrained/torchvision/R-50.pkl): a
  # torchvision ResNet .pth or detectron2 R-50.pkl path; '' = random init. Ignored when resuming.
  b.weights = ''

  e = m.encoder = ml_collections.ConfigDict()
  e.num_layers = 6  # TRANSFORMER_ENC_LAYERS
  e.num_heads = 8  # encoder MSDeformAttn heads
  e.num_points = 4  # encoder sampling points (hard default 4 in the official code)
  e.ffn_dim = 2048  # SEM_SEG_HEAD.DIM_FEEDFORWARD
  e.in_features = ('res3', 'res4', 'res5')  # DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES
  e.total_num_feature_levels = 4  # TOTAL_NUM_FEATURE_LEVELS: 3 backbone levels + 1 extra stride-2 level
  e.common_stride = 4  # COMMON_STRIDE: mask features at 1/4
  e.num_groups = 32  # GroupNorm groups
  e.dropout = 0.0  # DROPOUT

  d = m.decoder = ml_collections.ConfigDict()
  d.num_layers = 6  # DEC_LAYERS (MaskDINO's R50 configs use 9)
  d.num_heads = 8  # NHEADS
  d.num_points = 4  # dec_n_points
  d.ffn_dim = 2048  # DIM_FEEDFORWARD
  d.num_queries = 300  # NUM_OBJECT_QUERIES (k2: the queries that enter the decoder)
  d.initial_pred = True  # INITIAL_PRED: supervise the prediction made before decoder layer 0
  d.box_init = 'mask2box'  # INITIALIZE_BOX_TYPE: 'mask2box' (official, no +1), 'bitmask' (+1), 'none'
  d.dropout = 0.0  # DROPOUT

  di = m.di = ml_collections.ConfigDict()
  di.enabled = True  # De-Imbalance module (off = MaskDINO's single top-k selection)
  di.selection_ks = (
    600,
    300,
  )  # tokens kept by each selection: (k1, k2) = FIRST_SELECTED_QUERIES, NUM_OBJECT_QUERIES
  di.ti_layers = 2  # TI_LAYERS: token-interaction layers between consecutive selections
  di.random_position_tokens = False  # Table 3: random position (box) tokens for Q_bal (DI off: for the anchors)

  ba = m.bato = ml_collections.ConfigDict()
  ba.enabled = True  # Balance-Aware Tokens Optimization
  ba.num_guiding_tokens = 50  # NUM_GUIDING_TOKENS
  ba.guidance = 'decoder0'  # guiding queries: decoder0 (official: layer-0 output), T_i, T_s1, T_s2, Q_bal
  ba.guiding_token_generation = True  # GTG: mask + box networks make the guiding tokens (off: raw queries)
  ba.layer = 1  # decoder layer before which BATO runs (hard-wired to 1 in the official code)

  dn = m.dn = ml_collections.ConfigDict()
  dn.mode = 'seg'  # DN: 'seg' (labels + boxes + masks), 'none'
  dn.num = 100  # DN_NUM: denoising query budget (static slot count)
  dn.noise_scale = 0.4  # DN_NOISE_SCALE (label flip probability is noise_scale * 0.5)

  lo = c.loss = ml_collections.ConfigDict()
  lo.class_weight = 4.0  # CLASS_WEIGHT (focal loss)
  lo.mask_weight = 5.0  # MASK_WEIGHT (point-sampled BCE)
  lo.dice_weight = 5.0  # DICE_WEIGHT
  lo.box_weight = 5.0  # BOX_WEIGHT (L1)
  lo.giou_weight = 2.0  # GIOU_WEIGHT
  lo.detection_weight_scale = 1.0  # Table 3 imbalance test: multiplies class/box/giou weights (0.1 there)
  lo.focal_alpha = 0.25  # focal loss alpha, of the class loss and of the matcher's class cost (both 0.25 officially)
  lo.focal_gamma = 2.0  # focal loss gamma
  lo.num_points = 12544  # TRAIN_NUM_POINTS
  lo.oversample_ratio = 3.0  # OVERSAMPLE_RATIO
  lo.importance_sample_ratio = 0.75  # IMPORTANCE_SAMPLE_RATIO
  lo.recompute_points = False  # True: the backward selects the loss points again (top-k) instead of keeping them
  lo.deep_supervision = True  # DEEP_SUPERVISION: losses on every decoder layer and the initial prediction
  lo.mask_losses = True  # off for detection-only data
  lo.di_aux_losses = True  # class+box losses on every token-interaction layer (oldm_* terms)
  lo.interm_losses = True  # losses on the encoder (two-stage) selection

  mt = c.matcher = ml_collections.ConfigDict()
  mt.cost_class = 4.0  # COST_CLASS_WEIGHT
  mt.cost_mask = 5.0  # COST_MASK_WEIGHT
  mt.cost_dice = 5.0  # COST_DICE_WEIGHT
  mt.cost_box = 5.0  # COST_BOX_WEIGHT
  mt.cost_giou = 2.0  # COST_GIOU_WEIGHT
  mt.num_points = 12544  # points for the mask costs (shared by all masks of an image)

  o = c.optim = ml_collections.ConfigDict()
  o.lr = 1e-4  # BASE_LR (AdamW)
  o.weight_decay = 0.05  # WEIGHT_DECAY (0 for norms and embeddings)
  o.b1 = 0.9  # AdamW beta1 (torch default)
  o.b2 = 0.999  # AdamW beta2 (torch default)
  o.eps = 1e-8  # AdamW eps (torch default)
  o.backbone_multiplier = 0.1  # BACKBONE_MULTIPLIER
  o.clip_norm = 0.01  # CLIP_GRADIENTS: full-model L2 max-norm
  o.lr_scheduler = 'WarmupMultiStepLR'  # LR_SCHEDULER_NAME: 'WarmupMultiStepLR' or 'WarmupCosineLR'
  o.lr_end = 0.0  # BASE_LR_END: the final lr of WarmupCosineLR
  o.lr_drop_steps = steps  # SOLVER.STEPS (iterations; WarmupMultiStepLR)
  o.lr_drop_factor = 0.1  # SOLVER.GAMMA
  o.warmup_steps = 10  # WARMUP_ITERS (with WARMUP_FACTOR 1.0: no effective warmup)
  o.warmup_factor = 1.0  # WARMUP_FACTOR
  o.grad_accum_steps = 1  # gradient accumulation (optax.MultiSteps)

  me = c.mesh = ml_collections.ConfigDict()
  me.data = -1  # devices on the data-parallel axis (-1 = all devices of all hosts); train.batch_size must divide
  me.model = 1  # a second mesh axis for later (model parallelism): only 1 is implemented

  t = c.train = ml_collections.ConfigDict()
  t.num_steps = max_iter  # MAX_ITER
  t.batch_size = 16  # IMS_PER_BATCH (global)
  t.log_every = 20  # steps between metric lines
  t.checkpoint_every = 5000  # CHECKPOINT_PERIOD
  t.keep_checkpoints = 3  # checkpoints kept in the workdir
  # Evaluation during training (training/periodic_eval.py): every eval_every steps (0 = off) on data.val_split (its
  # first eval_max_images; 0 = eval.max_images), AP to metrics.jsonl / TensorBoard, the best checkpoint by best_metric
  # ('bbox/AP', 'segm/AP50', ...) in WORKDIR/best.
  t.eval_every = 0
  t.eval_max_images = 0
  t.best_metric = 'segm/AP'
  t.init_checkpoint = ''  # fine-tune: start from this checkpoint (e.g. python -m dimaskdino_jax.convert --out)
  # Loading init_checkpoint: False loads every parameter whose path and shape fit and re-initializes the rest (listed
  # at start); True stops at any difference.
  t.init_strict = False
  # Rows of the checkpoint's class heads kept for this model's classes (convert/init.py): '' none (re-initialized when
  # the class count differs); 'names': this dataset's category names matched to the checkpoint's; or one
  # comma-separated entry per class of this model: the checkpoint's category name or id, '-' for a new class
  # (e.g. 'person,3,-').
  t.init_class_map = ''
  # Parameters trained: 'all', or 'mask_branch' (Mask Frozen-DETR mode: the detector is frozen, only the mask
  # features, mask_embed and BATO's mask-feature update train; training/partition.py). Usually with init_checkpoint.
  t.trainable = 'all'
  t.max_consecutive_nonfinite = 5  # stop after this many consecutive skipped (non-finite loss / gradient) updates

  da = c.data = ml_collections.ConfigDict()
  da.name = 'coco2017'  # dataset name prepared with `python -m dimaskdino_jax.data.prepare`
  da.data_dir = 'data'  # where prepared datasets live
  da.train_split = 'train'  # prepared split for training
  da.val_split = 'val'  # prepared split for evaluation
  da.train_transform = 'lsj'  # 'lsj' (large-scale jitter) or 'resize'
  da.image_size = 1024  # LSJ IMAGE_SIZE: training canvas (square)
  da.min_scale = 0.1  # LSJ MIN_SCALE
  da.max_scale = 2.0  # LSJ MAX_SCALE
  da.random_flip = True  # RANDOM_FLIP horizontal
  da.pad_value = 128  # FixedSizeCrop pad value (before normalization)
  da.max_instances = 100  # GT slots per image (static shape)
  da.mask_stride = 4  # GT masks stored at this stride of the canvas
  da.filter_empty = True  # FILTER_EMPTY_ANNOTATIONS
  da.num_workers = 2  # grain worker processes
  da.test_short_edge = 800  # ResizeShortestEdge min size at test time
  da.test_max_size = 1333  # ResizeShortestEdge max size at test time
  da.eval_canvases = ((800, 1344), (1344, 800), (800, 800), (1344, 1344))  # static eval canvases (H, W)

  ev = c.eval = ml_collections.ConfigDict()
  ev.detections_per_image = 100  # TEST.DETECTIONS_PER_IMAGE
  ev.batch_size = 8  # eval images per jitted call
  ev.max_images = 0  # 0 = the whole split
  ev.use_faster_coco_eval = False  # faster-coco-eval instead of pycocotools (same numbers)
  return c
