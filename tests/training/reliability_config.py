"""The config of the reliability tests, also loadable by train.py in a subprocess:

  python train.py --config tests/training/reliability_config.py:DATA_DIR --workdir W [--config.train.num_steps=6]

The tiny model of tests/tiny.py with small-run training settings; tests/training/test_trainer.py uses it too (same
compiled step).
"""

from tests.tiny import set_field, tiny_config


def config_for(data_dir, steps=6, **overrides):
  c = tiny_config()
  c.data.data_dir = data_dir
  c.train.num_steps = steps
  c.train.batch_size = 4
  c.train.log_every = 1
  c.train.checkpoint_every = 2
  c.train.keep_checkpoints = 5
  c.optim.lr_drop_steps = (1000,)
  for key, value in overrides.items():
    set_field(c, key, value)
  return c


def get_config(arg=None):
  if not arg:
    raise ValueError('pass the prepared data directory: tests/training/reliability_config.py:DATA_DIR')
  return config_for(arg)
