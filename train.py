"""Train DI-MaskDINO.

  python train.py --config configs/shapes.py --workdir runs/shapes
  python train.py --config configs/dimaskdino_r50_coco.py:24ep --workdir runs/r50 --config.train.batch_size=8

Any config field can be overridden with --config.a.b=value. Training resumes from the newest complete
checkpoint in --workdir. The shapes config writes and prepares its synthetic dataset when it is missing.
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_cpu_experimental_ynn_fusion_type=-reduce')

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dimaskdino_jax.config import ConfigError, validate  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'configs/NAME.py[:variant]', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'run directory (checkpoints, metrics.jsonl, config.json)')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes at INFO
  config = _CONFIG.value
  try:
    validate(config, source=flags.FLAGS['config'].config_filename)
  except ConfigError as e:
    raise app.UsageError(str(e)) from e
  from dimaskdino_jax.training.trainer import train

  train(config, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
