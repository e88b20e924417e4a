r"""Convert an official DI-MaskDINO / MaskDINO checkpoint into an orbax checkpoint of this project.

  python -m dimaskdino_jax.convert --checkpoint dimaskdino_r50_12ep.pth \
      --config configs/dimaskdino_r50_coco.py --out runs/dimaskdino_r50_12ep
  python eval.py --config configs/dimaskdino_r50_coco.py --workdir runs/dimaskdino_r50_12ep

The checkpoint may be {'model': state_dict} (detectron2) or a bare state_dict, as `.pth` (read with
torch.load(weights_only=True); needs the optional torch extra) or `.pkl` (restricted unpickler). The conversion is
strict: a missing, unexpected or mis-shaped key stops it with the full list. OUT becomes a workdir holding
checkpoints/0 and config.json: evaluate it with eval.py --workdir OUT, or fine-tune from it with
train.py --config.train.init_checkpoint=OUT.
"""

from dimaskdino_jax import runtime  # noqa: E402

runtime.configure(restart=__name__ == '__main__')  # XLA_FLAGS; malloc tunables (a restart) as a script

import argparse  # noqa: E402
import sys  # noqa: E402

from dimaskdino_jax.config import ConfigError, load_config  # noqa: E402
from dimaskdino_jax.convert.torch_checkpoint import (  # noqa: E402
  CheckpointError,
  convert_state_dict,
  read_state_dict,
  save_variables,
)


def main(argv=None) -> str:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkpoint', required=True, help='official .pth / .pkl file')
  parser.add_argument('--config', required=True, help='configs/NAME.py[:variant] describing the same model')
  parser.add_argument('--out', required=True, help='output workdir (checkpoints/0 and config.json are written)')
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  try:
    config = load_config(args.config)
    sd = read_state_dict(args.checkpoint)
    variables = convert_state_dict(sd, config, source=args.checkpoint)
    step_dir = save_variables(args.out, config, variables)
  except (ConfigError, CheckpointError) as e:
    raise SystemExit(f'error: {e}') from None
  count = sum(int(v.size) for tree in variables.values() for v in _leaves(tree))
  print(f'converted {len(sd)} keys of {args.checkpoint} ({count:,} values) -> {step_dir}')
  print(f'evaluate: python eval.py --config {args.config} --workdir {args.out}')
  return step_dir


def _leaves(tree):
  for v in tree.values():
    if isinstance(v, dict):
      yield from _leaves(v)
    else:
      yield v


if __name__ == '__main__':
  main()
