"""Test setup: XLA flags must be set before jax is imported anywhere."""

import os

# The CPU fusion flag measured in docs/jax_notes.md (14x on deformable attention).
_flags = os.environ.get('XLA_FLAGS', '')
if 'ynn_fusion_type' not in _flags:
  _flags += ' --xla_cpu_experimental_ynn_fusion_type=-reduce'
os.environ['XLA_FLAGS'] = _flags.strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
