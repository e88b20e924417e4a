"""Checkpoint conversion: official PyTorch checkpoints and ImageNet backbones -> our variables.

`python -m dimaskdino_jax.convert --checkpoint official.pth --config configs/dimaskdino_r50_coco.py --out DIR`.
"""

from dimaskdino_jax.convert.safe_pickle import UnsafePickleError
from dimaskdino_jax.convert.torch_checkpoint import (
  CheckpointError,
  convert_backbone,
  convert_state_dict,
  read_state_dict,
  save_variables,
  to_state_dict,
)

__all__ = [
  'CheckpointError',
  'UnsafePickleError',
  'convert_backbone',
  'convert_state_dict',
  'read_state_dict',
  'save_variables',
  'to_state_dict',
]
