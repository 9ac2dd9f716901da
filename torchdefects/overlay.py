"""Pictures of anomaly maps, defect masks and regions, for people to look at.

Pure NumPy and Pillow (no OpenCV, no matplotlib): the background is the input
image or the anomaly map drawn as a heat map, the mask is outlined, and each
region gets its box and a ``#id score`` tag. Small pictures are enlarged by an
integer factor (nearest) so that one-pixel outlines and text stay legible.
"""

from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["heatmap", "mask_outline", "render_overlay"]

# Anchors of a perceptually ordered dark-to-bright map (close to "inferno"):
# low scores stay dark so that the outlines and boxes stand out on them.
_INFERNO_ANCHORS = np.array(
    [
        [0, 0, 4],
        [40, 11, 84],
        [101, 21, 110],
        [159, 42, 99],
        [212, 72, 66],
        [245, 125, 21],
        [250, 193, 39],
        [252, 255, 164],
    ],
    dtype=np.float64,
)


def _colormap_lut() -> np.ndarray:
    pos = np.linspace(0.0, 1.0, len(_INFERNO_ANCHORS))
    t = np.linspace(0.0, 1.0, 256)
    lut = np.stack([np.interp(t, pos, _INFERNO_ANCHORS[:, c]) for c in range(3)], axis=1)
    return np.round(lut).astype(np.uint8)


_LUT = _colormap_lut()


def heatmap(
    anomaly_map: np.ndarray, vmin: Optional[float] = None, vmax: Optional[float] = None
) -> np.ndarray:
    """Color an anomaly map.

    Args:
        anomaly_map: :math:`(H, W)` scores; NaN is drawn as black.
        vmin: score drawn darkest (default: the map's finite minimum).
        vmax: score drawn brightest (default: the map's finite maximum).

    Returns:
        :math:`(H, W, 3)` uint8 RGB.

    Example:
        >>> heatmap(np.linspace(0, 1, 12).reshape(3, 4)).shape
        (3, 4, 3)
    """
    a = np.asarray(anomaly_map, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"anomaly_map must have shape (H, W), got {list(a.shape)}")
    finite = np.isfinite(a)
    if vmin is None:
        vmin = float(a[finite].min()) if finite.any() else 0.0
    if vmax is None:
        vmax = float(a[finite].max()) if finite.any() else 1.0
    span = vmax - vmin if vmax > vmin else 1.0
    t = np.clip((np.where(finite, a, vmin) - vmin) / span, 0.0, 1.0)
    rgb = _LUT[np.round(t * 255).astype(np.intp)]
    rgb[~finite & ~np.isposinf(a)] = 0
    rgb[np.isposinf(a)] = _LUT[255]
    return rgb


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (the image border counts as outside).

    Args:
        mask: :math:`(H, W)` bool.

    Returns:
        :math:`(H, W)` bool, the inner boundary of every component.
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"mask must have shape (H, W), got {list(m.shape)}")
    p = np.pad(m, 1, constant_values=False)
    interior = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~interior


def _as_rgb(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise ValueError(
            "image must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), "
            f"got {list(img.shape)}"
        )
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    img = img[:, :, :3]
    if img.dtype != np.uint8:
        f = img.astype(np.float64)
        if f.size and np.nanmax(f) <= 1.0:
            f = f * 255.0
        img = np.clip(np.nan_to_num(f), 0, 255).round().astype(np.uint8)
    return img


def _resize_nearest(a: np.ndarray, h: int, w: int) -> np.ndarray:
    rows = np.minimum(((np.arange(h) + 0.5) * a.shape[0] / h).astype(np.intp), a.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * a.shape[1] / w).astype(np.intp), a.shape[1] - 1)
    return a[rows][:, cols]


def render_overlay(
    image: Optional[np.ndarray] = None,
    anomaly_map: Optional[np.ndarray] = None,
    mask: Optional[np.ndarray] = None,
    boxes_xyxy: Optional[Sequence[Sequence[float]]] = None,
    scores: Optional[Sequence[float]] = None,
    ids: Optional[Sequence[int]] = None,
    threshold: Optional[float] = None,
    min_side: int = 256,
    outline_rgb: Tuple[int, int, int] = (0, 255, 0),
    box_rgb: Tuple[int, int, int] = (0, 200, 255),
) -> Image.Image:
    """Draw the mask outline and the region boxes over an image or a heat map.

    The background is ``image`` when given, else ``anomaly_map`` as a heat map.
    ``mask`` and the boxes must be in the background's pixel space (resize
    them first when the map and the image differ in size). Boxes are inclusive
    ``[x1, y1, x2, y2]`` pixel boxes, as in :class:`~torchdefects.regions.Regions`.

    Args:
        image: :math:`(H, W)` or :math:`(H, W, 3)` uint8 (or float in [0, 1]).
        anomaly_map: :math:`(H, W)` float, used when ``image`` is None.
        mask: :math:`(H, W)` bool, outlined.
        boxes_xyxy: :math:`(R, 4)` inclusive boxes.
        scores: :math:`(R,)` printed next to each box (e.g. ``score_max``).
        ids: :math:`(R,)` region ids printed as ``#id``.
        threshold: printed in the top-left corner with the number of boxes.
        min_side: enlarge (integer factor, nearest) until the shorter side is at least this.

    Returns:
        An RGB :class:`PIL.Image.Image`.

    Example:
        >>> m = np.zeros((32, 32), dtype=np.float32); m[8:12, 8:16] = 1
        >>> pic = render_overlay(anomaly_map=m, mask=m > 0.5, boxes_xyxy=[[8, 8, 15, 11]])
        >>> pic.size
        (256, 256)
    """
    if image is not None:
        bg = _as_rgb(image)
    elif anomaly_map is not None:
        bg = heatmap(anomaly_map)
    else:
        raise ValueError("render_overlay needs image or anomaly_map, got neither")
    h, w = bg.shape[:2]
    if h == 0 or w == 0:
        raise ValueError(f"background must not be empty, got shape {[h, w]}")
    scale = max(1, -(-min_side // min(h, w)))
    big = np.repeat(np.repeat(bg, scale, axis=0), scale, axis=1)
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.shape != (h, w):
            raise ValueError(
                f"mask must have shape {[h, w]} like the background, got {list(m.shape)}"
            )
        # Outline at display resolution: one display pixel wide whatever the scale.
        edge = mask_outline(np.repeat(np.repeat(m, scale, axis=0), scale, axis=1))
        big[edge] = outline_rgb
    pic = Image.fromarray(big, mode="RGB")
    draw = ImageDraw.Draw(pic)
    font = ImageFont.load_default()
    boxes = [] if boxes_xyxy is None else [list(map(float, b)) for b in boxes_xyxy]
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        rect = [x1 * scale, y1 * scale, (x2 + 1) * scale - 1, (y2 + 1) * scale - 1]
        draw.rectangle(rect, outline=box_rgb, width=1)
        parts = []
        if ids is not None:
            parts.append(f"#{int(ids[i])}")
        if scores is not None:
            parts.append(f"{float(scores[i]):.3g}")
        if parts:
            text = ": ".join(parts)
            tx, ty = rect[0], rect[1] - 12
            if ty < 0:
                ty = rect[3] + 2
            bbox = draw.textbbox((tx, ty), text, font=font)
            draw.rectangle(bbox, fill=(0, 0, 0))
            draw.text((tx, ty), text, fill=box_rgb, font=font)
    if threshold is not None:
        text = f"t={threshold:.4g}  n={len(boxes)}"
        bbox = draw.textbbox((2, 2), text, font=font)
        draw.rectangle(bbox, fill=(0, 0, 0))
        draw.text((2, 2), text, fill=(255, 255, 255), font=font)
    return pic
