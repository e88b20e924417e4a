"""MaskDINO R50 (COCO instance segmentation, `maskdino_R50_bs16_50ep_4s_dowsample1_2048.yaml` layout).

The DI-MaskDINO reference config with DI and BATO off, 9 decoder layers and a single top-300 selection
(docs/official_vs_paper.md, "Configuration and switches"). Variants as in `dimaskdino_r50_coco.py` (`12ep`, `24ep`,
`50ep`; default `50ep`).
"""

from configs import dimaskdino_r50_coco


def get_config(arg=None):
  c = dimaskdino_r50_coco.get_config(arg or '50ep')
  c.name = c.name.replace('dimaskdino', 'maskdino')
  c.model.decoder.num_layers = 9  # DEC_LAYERS of the MaskDINO R50 configs
  c.model.di.enabled = False  # no De-Imbalance: one top-k selection
  c.model.di.selection_ks = (300,)  # topk = 300 directly
  c.model.bato.enabled = False  # no Balance-Aware Tokens Optimization
  return c
