"""Losses and Hungarian matching (docs/architecture.md, "Losses"): matcher.py, point_sampling.py, criterion.py."""

from dimaskdino_jax.losses.criterion import compute_losses, dn_assignment, loss_weights
from dimaskdino_jax.losses.matcher import gt_for_queries, hungarian_match, matching_costs
from dimaskdino_jax.losses.point_sampling import point_sample, uncertain_point_coords

__all__ = [
  'compute_losses',
  'dn_assignment',
  'gt_for_queries',
  'hungarian_match',
  'loss_weights',
  'matching_costs',
  'point_sample',
  'uncertain_point_coords',
]
