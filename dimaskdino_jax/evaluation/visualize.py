"""Drawing post-processed predictions on images with PIL: translucent masks, boxes, class names and scores.

    image = draw_predictions(image_uint8, result, class_names, score_threshold=0.3)   # PIL.Image
    save_prediction_grid('preds.png', [img0, img1], [res0, res1], class_names)     # images side by side

`result` is the dict of `postprocess.postprocess_image` in original-image coordinates: 'scores' (N,), 'labels' (N,)
contiguous class indices, 'boxes' (N, 4) absolute xyxy, 'masks' (N, H, W) bool or None. No matplotlib.
"""

import os
from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Distinct, saturated colours (RGB), cycled by detection rank.
PALETTE = (
  (230, 25, 75),
  (60, 180, 75),
  (255, 225, 25),
  (0, 130, 200),
  (245, 130, 48),
  (145, 30, 180),
  (70, 240, 240),
  (240, 50, 230),
  (210, 245, 60),
  (250, 190, 212),
  (0, 128, 128),
  (220, 190, 255),
  (170, 110, 40),
  (255, 250, 200),
  (128, 0, 0),
  (170, 255, 195),
  (128, 128, 0),
  (255, 215, 180),
  (0, 0, 128),
  (128, 128, 128),
)


def _font(size: int):
  try:
    return ImageFont.load_default(size=size)  # FreeType build of Pillow: a scalable font
  except (TypeError, ValueError, OSError):
    return ImageFont.load_default()


def _label_text(label: int, score: float, class_names) -> str:
  name = class_names[label] if class_names is not None and 0 <= label < len(class_names) else str(label)
  return f'{name} {score:.2f}'


def draw_predictions(
  image,
  result: Mapping,
  class_names: Sequence[str] | None = None,
  score_threshold: float = 0.3,
  alpha: float = 0.45,
) -> Image.Image:
  """The detections of `result` with score >= score_threshold drawn on `image`; returns a new RGB PIL image.

  image: uint8 (H, W, 3) array (or a PIL image) in original-image coordinates. result: see the module docstring;
  masks, when present, must be (N, H, W). Each kept detection gets a colour (by rank): its mask is blended in with
  opacity `alpha`, its box outlined, and '<class name> <score>' written at the box's top-left corner. Lower scores
  are drawn first, so the best detections end on top.
  """
  base = np.asarray(image.convert('RGB') if isinstance(image, Image.Image) else image)
  if base.ndim != 3 or base.shape[2] != 3:
    raise ValueError(f'image must be (H, W, 3); got shape {base.shape}')
  h, w = base.shape[:2]
  scores = np.asarray(result['scores'], np.float32).reshape(-1)
  labels = np.asarray(result['labels']).astype(np.int64).reshape(-1)
  boxes = np.asarray(result['boxes'], np.float32).reshape(-1, 4)
  masks = result.get('masks')
  if masks is not None:
    masks = np.asarray(masks)
    if masks.shape[1:] != (h, w):
      raise ValueError(f'masks {masks.shape[1:]} must have the image size {(h, w)} (post-processed masks)')
  keep = np.flatnonzero(scores >= score_threshold)
  keep = keep[np.argsort(-scores[keep], kind='stable')]  # best first: colour by rank
  colors = {int(i): PALETTE[r % len(PALETTE)] for r, i in enumerate(keep)}
  order = keep[::-1]  # draw the best last (on top)

  canvas = base.astype(np.float32)
  if masks is not None:
    for i in order:
      m = masks[i].astype(bool)
      canvas[m] = canvas[m] * (1.0 - alpha) + np.asarray(colors[int(i)], np.float32) * alpha
  out = Image.fromarray(np.clip(np.round(canvas), 0, 255).astype(np.uint8), 'RGB')

  draw = ImageDraw.Draw(out)
  line = max(1, round(min(h, w) / 200))
  font = _font(max(10, round(min(h, w) / 40)))
  for i in order:
    color = colors[int(i)]
    x0, y0, x1, y1 = (float(v) for v in boxes[i])
    x0, x1 = sorted((x0, x1))
    y0, y1 = sorted((y0, y1))
    draw.rectangle([x0, y0, x1, y1], outline=color, width=line)
    text = _label_text(int(labels[i]), float(scores[i]), class_names)
    tl, tt, tr, tb = draw.textbbox((0, 0), text, font=font)
    tw, th = tr - tl, tb - tt
    tx = min(max(x0, 0.0), max(w - tw - 2, 0))
    ty = y0 - th - 2 if y0 - th - 2 >= 0 else max(y0, 0.0)  # above the box when there is room, else inside
    draw.rectangle([tx, ty, tx + tw + 2, ty + th + 2], fill=color)
    text_color = (0, 0, 0) if sum(color) > 380 else (255, 255, 255)
    draw.text((tx + 1 - tl, ty + 1 - tt), text, fill=text_color, font=font)
  return out


def _enlarge(image, result, factor: int):
  """image (H, W, 3) and a result dict enlarged `factor` times (nearest neighbour for the image and masks)."""
  image = np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
  result = dict(result)
  result['boxes'] = np.asarray(result['boxes'], np.float32) * factor
  if result.get('masks') is not None:
    result['masks'] = np.repeat(np.repeat(np.asarray(result['masks']), factor, axis=1), factor, axis=2)
  return image, result


def save_prediction_grid(
  path,
  images: Sequence,
  results: Sequence[Mapping],
  class_names: Sequence[str] | None = None,
  score_threshold: float = 0.3,
  titles: Sequence[str] | None = None,
  height: int | None = None,
  gap: int = 4,
  min_draw_height: int = 256,
) -> Image.Image:
  """Draws each (image, result) with `draw_predictions` and writes them side by side as one PNG at `path`.

  An image shorter than `min_draw_height` is first enlarged by an integer factor (nearest neighbour, masks and
  boxes with it) so that text and outlines stay legible on small images. Every panel is then resized to `height`
  pixels (default: the tallest panel), keeping its aspect ratio; panels are separated by `gap` white pixels, and an
  optional title (e.g. the image id) is written in each panel's bottom-left corner. Returns the grid image.
  """
  if len(images) != len(results):
    raise ValueError(f'{len(images)} images but {len(results)} results')
  if not images:
    raise ValueError('save_prediction_grid needs at least one image')
  panels = []
  for img, res in zip(images, results):
    img = np.asarray(img.convert('RGB') if isinstance(img, Image.Image) else img)
    keep = np.asarray(res['scores']).reshape(-1) >= score_threshold  # only what is drawn
    res = {key: (None if v is None else np.asarray(v)[keep]) for key, v in res.items()}
    factor = -(-min_draw_height // img.shape[0]) if img.shape[0] < min_draw_height else 1
    if factor > 1:
      img, res = _enlarge(img, res, factor)
    panels.append(draw_predictions(img, res, class_names, score_threshold))
  height = int(height or max(p.height for p in panels))
  panels = [p.resize((max(1, round(p.width * height / p.height)), height), Image.BILINEAR) for p in panels]
  if titles is not None:
    font = _font(max(10, height // 25))
    for p, title in zip(panels, titles):
      d = ImageDraw.Draw(p)
      l, t, r, b = d.textbbox((0, 0), str(title), font=font)
      y = p.height - (b - t + 4)  # bottom-left: box labels sit at the top of their boxes
      d.rectangle([0, y, r - l + 4, p.height], fill=(0, 0, 0))
      d.text((2 - l, y + 2 - t), str(title), fill=(255, 255, 255), font=font)
  width = sum(p.width for p in panels) + gap * (len(panels) - 1)
  grid = Image.new('RGB', (width, height), (255, 255, 255))
  x = 0
  for p in panels:
    grid.paste(p, (x, 0))
    x += p.width + gap
  directory = os.path.dirname(os.fspath(path))
  if directory:
    os.makedirs(directory, exist_ok=True)
  grid.save(path, format='PNG')
  return grid
