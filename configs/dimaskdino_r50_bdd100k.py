"""DI-MaskDINO, ResNet-50, BDD100K instance segmentation (8 classes): the paper's schedule (appendix B.2).

The same model as `configs/dimaskdino_r50_coco.py` with 8 classes, trained 68 epochs at batch 8 with the lr
dropped (x0.1) at epoch 50. Other optimizer values (lr 1e-4, AdamW, clipping) and the LSJ 1024 augmentation are
the COCO config's. Prepare BDD100K's COCO-format export of the instance-segmentation labels (bdd100k's
`python -m bdd100k.label.to_coco --mode ins_seg`, or the released `ins_seg_{train,val}_coco.json`):

  python -m dimaskdino_jax.data.prepare --format coco --images bdd100k/images/10k/train \\
      --annotations ins_seg_train_coco.json --name bdd100k_ins_seg_train
  python -m dimaskdino_jax.data.prepare --format coco --images bdd100k/images/10k/val \\
      --annotations ins_seg_val_coco.json --name bdd100k_ins_seg_val
  python train.py --config configs/dimaskdino_r50_bdd100k.py --workdir runs/bdd100k
"""

from configs import dimaskdino_r50_coco

# BDD100K instance segmentation: 7,000 train and 1,000 val images of 1280 x 720; 8 classes. The step counts
# below are computed from these numbers (a prepared split of another size keeps these step counts).
TRAIN_IMAGES = 7000
EPOCHS = 68
LR_DROP_EPOCH = 50
BATCH_SIZE = 8
CLASSES = ('pedestrian', 'rider', 'car', 'truck', 'bus', 'train', 'motorcycle', 'bicycle')


def get_config(arg=None):
  del arg
  c = dimaskdino_r50_coco.get_config('12ep')
  c.name = 'dimaskdino_r50_bdd100k'
  c.model.num_classes = len(CLASSES)  # = the categories of the COCO-format export (checked when loading data)

  steps_per_epoch = TRAIN_IMAGES // BATCH_SIZE  # 875
  c.train.batch_size = BATCH_SIZE
  c.train.num_steps = EPOCHS * steps_per_epoch  # 59,500
  c.train.checkpoint_every = steps_per_epoch * 4
  c.optim.lr_drop_steps = (LR_DROP_EPOCH * steps_per_epoch,)  # 43,750

  d = c.data
  d.name = 'bdd100k_ins_seg'  # prepared with --name bdd100k_ins_seg_train / _val
  d.train_split = 'train'
  d.val_split = 'val'
  # Test resize (short 800, long <= 1333) maps 1280 x 720 to 1333 x 750: a 768 x 1344 canvas (4 % padding)
  # before the COCO buckets, which still hold any other size.
  d.eval_canvases = ((768, 1344), (800, 1344), (1344, 800), (800, 800), (1344, 1344))
  return c
