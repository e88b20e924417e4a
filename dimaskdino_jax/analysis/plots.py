"""matplotlib figures of the analyses (PNG; the Agg backend, no display needed).

plot_per_layer(metrics['per_layer'], 'per_layer.png')   # Fig. 1: AP box vs AP mask per decoder layer
plot_settings(rows, 'ablation.png')                     # AP box and AP mask of each setting, as grouped bars
"""

import math
import os


def _pyplot():
  import matplotlib

  matplotlib.use('Agg', force=False)
  import matplotlib.pyplot as plt

  return plt


def _ap(entry, iou_type):
  v = entry.get(iou_type, {}).get('AP', float('nan'))
  return float(v)


def plot_per_layer(per_layer, path, title: str | None = None) -> str:
  """The paper's Fig. 1 from evaluate(per_layer=True)['per_layer']: AP box and AP mask of every entry ('initial',
  'decoder_0', ...) as lines (left), and as bars at the first decoder layer and the final layer with the box - mask
  gap written above them (right: the detection-segmentation imbalance). Returns path."""
  plt = _pyplot()
  names = [e['layer'] for e in per_layer]
  box = [_ap(e, 'bbox') for e in per_layer]
  mask = [_ap(e, 'segm') for e in per_layer]
  has_mask = not all(math.isnan(v) for v in mask)
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={'width_ratios': [3, 2]})
  x = list(range(len(names)))
  ax0.plot(x, box, 'o-', label='AP box')
  if has_mask:
    ax0.plot(x, mask, 's-', label='AP mask')
  ax0.set_xticks(x, names, rotation=30, ha='right')
  ax0.set_ylabel('AP (%)')
  ax0.set_title('AP per decoder layer')
  ax0.grid(alpha=0.3)
  ax0.legend()

  first = names.index('decoder_0') if 'decoder_0' in names else 0
  picks = [(f'first layer\n({names[first]})', first), (f'final layer\n({names[-1]})', len(names) - 1)]
  width = 0.35
  for j, (_, i) in enumerate(picks):
    ax1.bar(j - width / 2, box[i], width, color='C0', label='AP box' if j == 0 else None)
    if has_mask:
      ax1.bar(j + width / 2, mask[i], width, color='C1', label='AP mask' if j == 0 else None)
      gap = box[i] - mask[i]
      finite = [v for v in (box[i], mask[i]) if not math.isnan(v)]
      top = max(finite) if finite else 0.0
      ax1.annotate(f'box - mask\n{gap:+.1f}', (j, top), ha='center', va='bottom', fontsize=9)
  ax1.set_xticks(range(len(picks)), [p[0] for p in picks])
  ax1.set_ylabel('AP (%)')
  ax1.set_title('detection-segmentation imbalance')
  ax1.margins(y=0.25)
  ax1.legend()
  if title:
    fig.suptitle(title)
  _save(fig, path)
  return path


def plot_settings(rows, path, title: str | None = None) -> str:
  """Grouped bars of AP box and AP mask per setting; rows: [{'name', 'AP_box', 'AP_mask'}, ...]. Returns path."""
  plt = _pyplot()
  names = [r['name'] for r in rows]
  fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(names) + 2), 4))
  width = 0.38
  x = list(range(len(names)))
  ax.bar([i - width / 2 for i in x], [r['AP_box'] for r in rows], width, label='AP box')
  ax.bar([i + width / 2 for i in x], [r['AP_mask'] for r in rows], width, label='AP mask')
  ax.set_xticks(x, names, rotation=30, ha='right')
  ax.set_ylabel('AP (%)')
  ax.grid(axis='y', alpha=0.3)
  ax.legend()
  if title:
    ax.set_title(title)
  _save(fig, path)
  return path


def _save(fig, path):
  """Lays out, writes (creating the directory) and closes the figure."""
  fig.tight_layout()
  directory = os.path.dirname(os.fspath(path))
  if directory:
    os.makedirs(directory, exist_ok=True)
  fig.savefig(path, format='png', dpi=110)
  _pyplot().close(fig)
