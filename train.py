"""Train DI-MaskDINO.

  python train.py --config configs/shapes.py --workdir runs/shapes
  python train.py --config configs/dimaskdino_r50_coco.py:24ep --workdir runs/r50 --config.train.batch_size=8

Several hosts (README, "Scaling out"): run the same command on every host with
  --coordinator_address=HOST0:PORT --num_processes=N --process_id=I
(or the environment variables JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or under SLURM's srun,
where they are detected). All devices of all hosts form the data-parallel mesh (config.mesh).

Any config field can be overridden with --config.a.b=value. Training resumes from the newest complete
checkpoint in --workdir. The shapes config writes and prepares its synthetic dataset when it is missing.

Exit status: 0 done; 1 a training error (non-finite updates, checkpoint write failure, checkpoint / config
mismatch), printed without a traceback; 128 + N after signal N (SIGTERM 143, SIGINT 130), once a checkpoint of the
current step is written: rerun the same command to resume.
"""

import shlex
import sys

from dimaskdino_jax import runtime  # noqa: E402

runtime.configure(restart=__name__ == '__main__')  # XLA_FLAGS; malloc tunables (a restart) as a script

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dimaskdino_jax.config import ConfigError, validate  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'configs/NAME.py[:variant]', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'run directory (checkpoints, metrics.jsonl, config.json)')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'multi-host: HOST:PORT of process 0')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'multi-host: number of processes')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'multi-host: this process, 0 .. num_processes - 1')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every file it writes at INFO
  config = _CONFIG.value
  try:
    validate(config, source=flags.FLAGS['config'].config_filename)
  except ConfigError as e:
    raise app.UsageError(str(e)) from e
  from dimaskdino_jax.training import sharding

  try:  # before any other jax call
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except sharding.MeshError as e:
    raise app.UsageError(str(e)) from e
  from dimaskdino_jax.training.checkpoint import CheckpointError, CheckpointMismatchError
  from dimaskdino_jax.training.trainer import NonFiniteError, TrainingInterrupted, train

  try:
    train(config, _WORKDIR.value)
  except TrainingInterrupted as e:
    print(f'{e}\nTo resume: python {shlex.join(sys.argv)}', file=sys.stderr, flush=True)
    sys.exit(128 + e.signum)
  except (NonFiniteError, CheckpointError, CheckpointMismatchError, sharding.MeshError, ConfigError) as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
