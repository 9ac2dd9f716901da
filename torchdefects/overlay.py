"""Pictures of anomaly maps, defect masks and regions, for people to look at.

Pure NumPy and Pillow (no OpenCV, no matplotlib). What a picture shows (see
``docs/outputs.md``):

- **Colours on a fixed scale anchored at the threshold.** A score ``v`` is placed on
  ``[lo, hi]`` piecewise linearly so that the threshold always sits at the middle
  (anomalib's convention: the threshold is 0.5 of the normalized scale). Below the
  threshold the colours recede (dark, desaturated blue-greys); at and above it they
  alarm (red, orange, yellow, light yellow at ``hi``). The colour family follows the
  head's own rule (``map >= threshold`` is foreground), so a pixel is warm exactly
  when it would be foreground before morphology. ``lo`` and ``hi`` come from the
  caller (calibration's normal-pixel statistics, see :func:`scale_from_provenance`),
  else from :func:`map_scale`'s rule.
- **A colour bar** with ticks at ``lo``, the threshold (a long tick) and ``hi``, and a
  marker at this map's maximum.
- **On images**, the heat map blended over the (slightly dimmed, desaturated) image:
  nothing below the threshold's lower half, a faint cool tint just below it, warm
  colours above it.
- **Regions**: outline of the mask and a box per region in a high-contrast defect
  colour (cyan with a dark edge), each with a tag ``rank | score | area`` where rank is
  the region's position in the list given (1 = first = the worst in report order), not
  its raster label. Tags are placed inside the picture, beside their box when there is
  room, avoiding boxes and other tags; a tag drops its area, then its score, rather than
  cover another tag.
- **A banner** above the picture: OK/NG, region count, worst score and threshold, and a
  one-line legend.

Small pictures are enlarged by an integer factor (nearest) until the shorter side is
at least ``min_side`` (512 by default: a 128 px map becomes 512 px), without making the
longer side exceed ``max_side``. Line widths and font sizes follow the displayed size,
so that pictures read the same at 128 px and at 4096 px.
"""

import math
import numbers
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "MapScale",
    "heatmap",
    "map_scale",
    "mask_outline",
    "render_overlay",
    "render_record",
    "scale_from_provenance",
]

# Anchors of a perceptually ordered dark-to-bright map (close to "inferno"): used only
# when no threshold is known (plain min-max heat map).
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

# Threshold-anchored palette. Positions are on the normalized scale [0, 1] with the
# threshold at 0.5. Below: dark desaturated blue-greys (recede). At and above: warm
# colours getting brighter (alarm). Luminance rises monotonically within each half.
_RECEDE_POS = np.array([0.0, 0.25, 0.5])
_RECEDE_RGB = np.array([[10, 12, 20], [34, 40, 56], [80, 88, 108]], dtype=np.float64)
_ALARM_POS = np.array([0.5, 0.65, 0.8, 0.92, 1.0])
_ALARM_RGB = np.array(
    [[214, 40, 40], [240, 100, 30], [252, 175, 40], [255, 230, 90], [255, 240, 140]],
    dtype=np.float64,
)

# Defect colour (outlines, boxes, rank tags) and its dark edge.
_DEFECT_RGB = (0, 229, 255)
_EDGE_RGB = (0, 0, 0)
_NG_RGB = (200, 30, 30)
_OK_RGB = (30, 140, 60)
_PANEL_RGB = (24, 26, 32)
_TEXT_RGB = (235, 235, 235)
_NAN_RGB = ((70, 70, 70), (110, 110, 110))  # checkerboard of "no data"


def _lut(anchors: np.ndarray) -> np.ndarray:
    pos = np.linspace(0.0, 1.0, len(anchors))
    t = np.linspace(0.0, 1.0, 256)
    lut = np.stack([np.interp(t, pos, anchors[:, c]) for c in range(3)], axis=1)
    return np.round(lut).astype(np.uint8)


_LUT = _lut(_INFERNO_ANCHORS)


class MapScale(NamedTuple):
    """The ends and the anchor of the overlay colour scale.

    Attributes:
        lo: score drawn darkest (position 0 of the scale).
        threshold: the pixel threshold (position 0.5).
        hi: score drawn brightest (position 1).
        source: ``"given"`` (both ends from the caller or calibration) or ``"map"``
            (at least one end from :func:`map_scale`'s rule).
    """

    lo: float
    threshold: float
    hi: float
    source: str


def _number(name: str, value: Any, allow_none: bool = True) -> Optional[float]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def _as_map(anomaly_map: Any, name: str = "anomaly_map") -> np.ndarray:
    a = np.asarray(anomaly_map)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise ValueError(f"{name} must have shape (H, W), got {list(a.shape)}")
    if a.dtype == np.bool_ or not (
        np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)
    ):
        raise TypeError(f"{name} must hold real numbers, got dtype {a.dtype}")
    return a


def map_scale(
    anomaly_map: Optional[np.ndarray],
    threshold: float,
    lo: Optional[float] = None,
    hi: Optional[float] = None,
) -> MapScale:
    """The colour scale of one picture: given ends, else the documented rule.

    The rule for a missing end (``m0``/``m1`` the map's finite min/max):

    - ``lo = min(m0, threshold)``; when the map has nothing below the threshold (or no
      finite pixel), ``lo = threshold - max(m1 - threshold, |threshold|, 1)``.
    - ``hi = max(m1, 2 * threshold - lo)``: the upper half is at least as wide as the
      lower one, so a normal map whose maximum is just above the threshold gets colours
      just above the middle (dark red, not a blazing field), while a map whose maximum
      is far above the threshold reaches the brightest colours at its maximum.

    Ends that do not straddle the threshold are invalid (``lo < threshold < hi``).

    Args:
        anomaly_map: :math:`(H, W)` scores (NaN and infinities ignored), or None.
        threshold: the pixel threshold.
        lo: score at the dark end (e.g. the calibration's normal-pixel minimum).
        hi: score at the bright end.

    Returns:
        :class:`MapScale`.

    Example:
        >>> m = np.array([[0.1, 0.5], [0.6, 0.64]])
        >>> map_scale(m, 0.627)
        MapScale(lo=0.1, threshold=0.627, hi=1.154, source='map')
        >>> map_scale(m, 0.627, lo=0.0, hi=2.0).source
        'given'
    """
    thr = _number("threshold", threshold, allow_none=False)
    lo = _number("lo", lo)
    hi = _number("hi", hi)
    assert thr is not None
    source = "given" if lo is not None and hi is not None else "map"
    m0 = m1 = None
    if anomaly_map is not None and (lo is None or hi is None):
        a = _as_map(anomaly_map).astype(np.float64)
        f = a[np.isfinite(a)]
        if f.size:
            m0, m1 = float(f.min()), float(f.max())
    if lo is None:
        if m0 is not None and m0 < thr:
            lo = m0
        else:
            above = (m1 - thr) if m1 is not None else 0.0
            lo = thr - max(above, abs(thr), 1.0)
    if hi is None:
        hi = max(m1 if m1 is not None else -math.inf, 2.0 * thr - lo)
        hi = float(round(hi, 12))
    if not lo < thr < hi:
        raise ValueError(f"lo < threshold < hi must hold, got lo={lo}, threshold={thr}, hi={hi}")
    return MapScale(lo, thr, hi, source)


def scale_from_provenance(
    provenance: Optional[Dict[str, Any]], threshold: float
) -> Optional[MapScale]:
    """A fixed scale from the normal-pixel extremes a calibration kept, if it kept them.

    Reads ``normal_min`` and ``normal_max`` (see docs/calibration.md) from ``provenance``
    or from its nested ``stored_provenance`` (a threshold read from a config). The scale
    is ``lo = normal_min`` and ``hi = max(normal_max, 2 * threshold - lo)``: the same for
    every picture of a run.

    Args:
        provenance: a threshold provenance record (or None).
        threshold: the pixel threshold used.

    Returns:
        :class:`MapScale` with ``source="given"``, or None when the extremes are missing
        (or ``normal_min`` is not below the threshold).

    Example:
        >>> scale_from_provenance({"normal_min": 0.0, "normal_max": 0.7}, 0.6)
        MapScale(lo=0.0, threshold=0.6, hi=1.2, source='given')
        >>> scale_from_provenance({"source": "explicit"}, 0.6) is None
        True
    """
    prov = provenance
    while isinstance(prov, dict):
        lo, hi = prov.get("normal_min"), prov.get("normal_max")
        ok = all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
            for v in (lo, hi)
        )
        if ok and float(lo) < threshold:  # type: ignore[arg-type]
            lo_f = float(lo)  # type: ignore[arg-type]
            hi_f = float(round(max(float(hi), 2.0 * threshold - lo_f), 12))  # type: ignore[arg-type]
            return MapScale(lo_f, float(threshold), hi_f, "given")
        prov = prov.get("stored_provenance")
    return None


_STEPS = 4096  # colours per half of the scale


def _palette(t: np.ndarray, above: np.ndarray) -> np.ndarray:
    """Exact palette colours (float64) at positions ``t`` on the side ``above``."""
    out = np.empty(np.shape(t) + (3,), dtype=np.float64)
    for c in range(3):
        out[..., c] = np.where(
            above,
            np.interp(t, _ALARM_POS, _ALARM_RGB[:, c]),
            np.interp(t, _RECEDE_POS, _RECEDE_RGB[:, c]),
        )
    return out


def _make_palette_lut() -> np.ndarray:
    u = np.arange(_STEPS) / (_STEPS - 1)
    below = _palette(0.5 * u, np.zeros(_STEPS, dtype=bool))
    above = _palette(0.5 + 0.5 * u, np.ones(_STEPS, dtype=bool))
    return np.concatenate([below, above]).astype(np.float32)


_PALETTE_LUT = _make_palette_lut()  # (2 * _STEPS, 3): below half, then at/above half
_PALETTE_LUT_U8 = np.rint(_PALETTE_LUT).astype(np.uint8)


def _positions(a: np.ndarray, scale: MapScale) -> Tuple[np.ndarray, np.ndarray]:
    """Positions in [0, 1] and the ``>= threshold`` side, compared like the head.

    NaN gets position 0 (callers paint it apart); ``+inf`` 1, ``-inf`` 0.
    """
    cmp_dtype = np.float64 if a.dtype == np.float64 else np.float32
    above = a.astype(cmp_dtype, copy=False) >= cmp_dtype(scale.threshold)
    f = a.astype(np.float64 if a.size < 65536 else np.float32, copy=False)
    lo, thr, hi = scale.lo, scale.threshold, scale.hi
    with np.errstate(invalid="ignore", over="ignore"):
        t = np.where(above, 0.5 + 0.5 * (f - thr) / (hi - thr), 0.5 * (f - lo) / (thr - lo))
    t = np.nan_to_num(t, nan=0.0, posinf=1.0, neginf=0.0, copy=False)
    # The side decides the colour family: values in (thr - eps, thr) stay below 0.5.
    t = np.where(above, np.clip(t, 0.5, 1.0), np.clip(t, 0.0, 0.5))
    return t, above


def _colours(t: np.ndarray, above: np.ndarray, u8: bool = False) -> np.ndarray:
    """Palette colours by table (4096 steps per half): float32 RGB, or rounded uint8."""
    idx = np.rint(t * (2 * (_STEPS - 1))).astype(np.intp)
    idx[above] += 1  # position 0.5 on the upper side is the first alarm colour
    return (_PALETTE_LUT_U8 if u8 else _PALETTE_LUT)[idx]


def heatmap(
    anomaly_map: np.ndarray,
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
    threshold: Optional[float] = None,
) -> np.ndarray:
    """Colour an anomaly map.

    With ``threshold``: the threshold-anchored palette on ``map_scale(map, threshold,
    vmin, vmax)`` (below the threshold dark blue-greys, at and above it red to near
    white). Without it: a plain dark-to-bright map (inferno-like) from ``vmin`` to
    ``vmax`` (default: the map's finite min and max).

    NaN is black; ``+inf`` is the brightest colour, ``-inf`` the darkest.

    Args:
        anomaly_map: :math:`(H, W)` scores.
        vmin: score drawn darkest.
        vmax: score drawn brightest.
        threshold: the pixel threshold, drawn at the middle of the scale.

    Returns:
        :math:`(H, W, 3)` uint8 RGB.

    Example:
        >>> heatmap(np.linspace(0, 1, 12).reshape(3, 4)).shape
        (3, 4, 3)
        >>> heatmap(np.array([[0.0, 0.5, 1.0]]), threshold=0.5).tolist()
        [[[10, 12, 20], [214, 40, 40], [255, 240, 140]]]
    """
    a = _as_map(anomaly_map)
    finite = np.isfinite(a)
    if threshold is not None:
        scale = map_scale(a, threshold, vmin, vmax)
        t, above = _positions(a, scale)
        rgb = _colours(t, above, u8=True)
        rgb[np.isnan(a)] = 0
        return rgb
    f = a.astype(np.float64)
    if vmin is None:
        vmin = float(f[finite].min()) if finite.any() else 0.0
    if vmax is None:
        vmax = float(f[finite].max()) if finite.any() else 1.0
    span = vmax - vmin if vmax > vmin else 1.0
    t = np.clip((np.where(finite, f, vmin) - vmin) / span, 0.0, 1.0)
    rgb = _LUT[np.round(t * 255).astype(np.intp)]
    rgb[~finite & ~np.isposinf(f)] = 0
    rgb[np.isposinf(f)] = _LUT[255]
    return rgb


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (the image border counts as outside).

    Args:
        mask: :math:`(H, W)` bool.

    Returns:
        :math:`(H, W)` bool, the inner boundary of every component.

    Example:
        >>> m = np.zeros((5, 5), bool); m[1:4, 1:4] = True
        >>> int(mask_outline(m).sum())
        8
    """
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError(f"mask must have shape (H, W), got {list(m.shape)}")
    p = np.pad(m, 1, constant_values=False)
    interior = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~interior


# ----------------------------------------------------------------------------
# Drawing helpers
# ----------------------------------------------------------------------------


def _as_rgb(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3, 4):
        raise ValueError(
            "image must have shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), "
            f"got {list(np.asarray(image).shape)}"
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
    """Nearest by pixel centres: output pixel ``i`` takes ``floor((i + 0.5) * n / h)``."""
    rows = np.minimum(((np.arange(h) + 0.5) * a.shape[0] / h).astype(np.intp), a.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) * a.shape[1] / w).astype(np.intp), a.shape[1] - 1)
    return a[rows][:, cols]


def _upscale(a: np.ndarray, k: int) -> np.ndarray:
    if k == 1:
        return a.copy()  # never draw into the caller's array
    return np.repeat(np.repeat(a, k, axis=0), k, axis=1)


def _dilate(m: np.ndarray, r: int) -> np.ndarray:
    """Dilation by a (2r+1) square, separable, border outside."""
    if r <= 0:
        return m
    out = m.copy()
    for s in range(1, r + 1):
        out[s:, :] |= m[:-s, :]
        out[:-s, :] |= m[s:, :]
    m2 = out.copy()
    for s in range(1, r + 1):
        out[:, s:] |= m2[:, :-s]
        out[:, :-s] |= m2[:, s:]
    return out


class _Font:
    """Text at a pixel size: Pillow's scalable default font, else its bitmap font scaled."""

    def __init__(self, px: int) -> None:
        self.px = int(px)
        self.ft: Optional[Any] = None
        try:
            f = ImageFont.load_default(size=self.px)  # Pillow >= 10.1 with FreeType
            if isinstance(f, ImageFont.FreeTypeFont):
                self.ft = f
        except TypeError:
            pass
        if self.ft is not None:
            asc, desc = self.ft.getmetrics()
            self.height = int(asc + desc)
        else:
            self.bitmap = ImageFont.load_default()
            self.k = max(1, round(self.px / 11))
            self.height = 11 * self.k

    def width(self, text: str) -> int:
        if self.ft is not None:
            return math.ceil(self.ft.getlength(text))
        _l, _, r, _ = self.bitmap.getbbox(text)
        return int(r) * self.k

    def draw(self, pic: Image.Image, xy: Tuple[int, int], text: str, fill: Tuple[int, ...]) -> None:
        x, y = int(xy[0]), int(xy[1])
        if self.ft is not None:
            ImageDraw.Draw(pic).text((x, y), text, font=self.ft, fill=fill, anchor="la")
            return
        w = max(1, self.width(text) // self.k)
        small = Image.new("L", (w, 11), 0)
        ImageDraw.Draw(small).text((0, 0), text, font=self.bitmap, fill=255)
        big = small.resize((w * self.k, 11 * self.k), Image.NEAREST)
        pic.paste(Image.new("RGB", big.size, fill[:3]), (x, y), big)


def _fmt(v: Optional[float], digits: int = 3) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    return f"{v:.{digits}g}"


def _overlap(a: Sequence[float], b: Sequence[float]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(0.0, w) * max(0.0, h)


def _place(
    size: Tuple[int, int],
    box: Sequence[float],
    area: Tuple[int, int],
    boxes: List[Sequence[float]],
    tags: List[Sequence[float]],
    gap: int,
) -> Tuple[int, int, float]:
    """``(x, y, cover)``: top-left of a ``size`` tag beside ``box``, clamped into ``area``
    (w, h), and the area of the placed ``tags`` it covers.

    Candidates: above (left then right aligned), below, right, left, then inside the
    box's top-left corner. The first without overlap wins, else the least weighted
    overlap: another tag (weight 16: covered text is lost), its own box (4), other
    ``boxes`` (1).
    """
    tw, th = size
    W, H = area
    x1, y1, x2, y2 = box
    cands = [
        (x1, y1 - th - gap),
        (x2 - tw, y1 - th - gap),
        (x1, y2 + gap),
        (x2 - tw, y2 + gap),
        (x2 + gap, y1),
        (x1 - tw - gap, y1),
        (x2 + gap, y2 - th),
        (x1 - tw - gap, y2 - th),
        (x1 + gap, y1 + gap),
    ]
    best = None
    for cx, cy in cands:
        cx = int(min(max(cx, 0), max(W - tw, 0)))
        cy = int(min(max(cy, 0), max(H - th, 0)))
        r = (cx, cy, cx + tw, cy + th)
        cover = sum(_overlap(r, t) for t in tags)
        cost = 16.0 * cover + 4.0 * _overlap(r, box) + sum(_overlap(r, o) for o in boxes)
        if cost == 0.0:
            return cx, cy, 0.0
        if best is None or cost < best[0]:
            best = (cost, cx, cy, cover)
    assert best is not None
    return best[1], best[2], best[3]


def _flow(words: List[Tuple[str, Any]], font: _Font, width: int, gap: int) -> List[List[Any]]:
    """Greedy line breaking of (text, colour) chips into lines no wider than ``width``."""
    lines: List[List[Any]] = [[]]
    x = 0
    for text, colour in words:
        w = font.width(text)
        if lines[-1] and x + w > width:
            lines.append([])
            x = 0
        lines[-1].append((text, colour, x))
        x += w + gap
    return lines


# ----------------------------------------------------------------------------
# The picture
# ----------------------------------------------------------------------------


def render_overlay(
    image: Optional[np.ndarray] = None,
    anomaly_map: Optional[np.ndarray] = None,
    mask: Optional[np.ndarray] = None,
    boxes_xyxy: Optional[Sequence[Sequence[float]]] = None,
    scores: Optional[Sequence[float]] = None,
    ids: Optional[Sequence[int]] = None,
    threshold: Optional[float] = None,
    min_side: int = 512,
    outline_rgb: Tuple[int, int, int] = _DEFECT_RGB,
    box_rgb: Tuple[int, int, int] = _DEFECT_RGB,
    *,
    areas: Optional[Sequence[int]] = None,
    lo: Optional[float] = None,
    hi: Optional[float] = None,
    max_side: int = 2048,
    defective: Optional[bool] = None,
    image_score: Optional[float] = None,
    title: Optional[str] = None,
    provenance: Optional[Dict[str, Any]] = None,
    severities: Optional[Sequence[Optional[str]]] = None,
    image_severity: Optional[str] = None,
) -> Image.Image:
    """Draw the heat map, the mask outline, ranked region boxes, a banner and a colour bar.

    The picture is ``image`` with ``anomaly_map`` blended over it when both are given,
    ``image`` alone, or ``anomaly_map`` as a heat map. ``mask`` and the boxes must be in
    the background's pixel space (resize them first when the map and the image differ);
    an ``anomaly_map`` of another size than ``image`` is stretched over it (nearest,
    like a ``resize`` image space; pass it already in image space, NaN where it does not
    cover, for other relations). Boxes are inclusive ``[x1, y1, x2, y2]`` as in
    :class:`~torchdefects.regions.Regions`.

    Regions are tagged ``rank | score | area px`` with rank = 1 + their position in the
    lists given (give them in report order: worst first), or ``rank | severity | score |
    area px`` with ``severities`` (the class names of ``severity_rules``; ``-`` for a region
    that takes none). The banner says NG when there is a region (or when ``defective`` says
    so), the region count, the worst score, the image's severity when given and the
    threshold.

    The returned image's ``info["torchdefects.layout"]`` holds where things were drawn
    (canvas pixels): ``picture`` ``[x, y, w, h]``, ``scale`` (the enlargement factor),
    ``colorbar`` ``[x, y, w, h]`` of the bar, ``threshold_y`` (the threshold tick's row),
    ``tags`` (``{"rank", "xyxy"}`` per region, in rank order), ``verdict`` and ``badge``
    (the OK/NG box) and ``scale_ends`` (``[lo, threshold, hi]``).

    Args:
        image: :math:`(H, W)`, :math:`(H, W, 3)` or :math:`(H, W, 4)` uint8 (or float in
            [0, 1]).
        anomaly_map: :math:`(h, w)` scores: the background when ``image`` is None, else
            blended over it.
        mask: :math:`(H, W)` bool, outlined.
        boxes_xyxy: :math:`(R, 4)` inclusive boxes, in report order.
        scores: :math:`(R,)` printed in each tag (e.g. ``score_max``).
        ids: :math:`(R,)` accepted for backward compatibility and not drawn: tags show
            the rank, not the raster label.
        threshold: the pixel threshold (anchors the colour scale; in the banner).
        min_side: enlarge (integer factor, nearest) until the shorter side is at least
            this ...
        outline_rgb: colour of the mask outline.
        box_rgb: colour of the boxes and tags.
        areas: :math:`(R,)` region areas printed in each tag (the record's map pixels).
        lo: score at the dark end of the colour scale (default: :func:`map_scale`).
        hi: score at the bright end.
        max_side: ... without the longer side exceeding this (or the original size).
        defective: the image's verdict when known (e.g. the record's label); default:
            NG when there is at least one region.
        image_score: the image's score, printed in the banner when given.
        title: a line printed above the banner (e.g. the input's name).
        provenance: the threshold's provenance record: when ``lo`` and ``hi`` are not
            given and it holds calibration's normal-pixel statistics, the scale's ends come
            from them (:func:`scale_from_provenance`), the same for every picture of a run.
        severities: :math:`(R,)` each region's severity name (None: no rule holds), printed
            in its tag before the score; the tag drops the area, then the score, before it.
        image_severity: the image's severity name, printed in the banner.

    Returns:
        An RGB :class:`PIL.Image.Image`.

    Example:
        >>> m = np.zeros((32, 32), dtype=np.float32); m[8:12, 8:16] = 1
        >>> pic = render_overlay(anomaly_map=m, mask=m > 0.5, boxes_xyxy=[[8, 8, 15, 11]],
        ...                      scores=[1.0], areas=[32], threshold=0.5)
        >>> pic.info["torchdefects.layout"]["picture"][2:]
        [512, 512]
    """
    del ids  # tags show ranks
    if not isinstance(min_side, int) or isinstance(min_side, bool) or min_side < 1:
        raise ValueError(f"min_side must be an integer >= 1, got {min_side!r}")
    if not isinstance(max_side, int) or isinstance(max_side, bool) or max_side < 1:
        raise ValueError(f"max_side must be an integer >= 1, got {max_side!r}")
    thr = _number("threshold", threshold)
    amap = None if anomaly_map is None else _as_map(anomaly_map)

    if image is not None:
        bg = _as_rgb(image)
    elif amap is not None:
        bg = None
    else:
        raise ValueError("render_overlay needs image or anomaly_map, got neither")
    h, w = bg.shape[:2] if bg is not None else amap.shape  # type: ignore[union-attr]
    if h == 0 or w == 0:
        raise ValueError(f"background must not be empty, got shape {[h, w]}")
    if amap is not None and (amap.shape[0] == 0 or amap.shape[1] == 0):
        raise ValueError(f"anomaly_map must not be empty, got shape {list(amap.shape)}")

    scale: Optional[MapScale] = None
    if amap is not None and thr is not None:
        fixed = scale_from_provenance(provenance, thr) if lo is None and hi is None else None
        scale = fixed if fixed is not None else map_scale(amap, thr, lo, hi)
    map_max = map_min = None
    if amap is not None:
        fin = amap[np.isfinite(amap)]
        if fin.size:
            map_min, map_max = float(fin.min()), float(fin.max())
    # Without a threshold: a plain min-max scale (no anchor).
    vmin = lo if lo is not None else map_min
    vmax = hi if hi is not None else map_max

    # Colour the picture at source resolution, then enlarge.
    if bg is None:
        assert amap is not None
        if scale is not None:
            t, above = _positions(amap, scale)
            rgb = _colours(t, above, u8=True)
        else:
            rgb = heatmap(amap, lo, hi)
        nan_src = np.isnan(amap)
    else:
        rgb = bg
        nan_src = None
        if amap is not None and scale is not None:
            m = amap if amap.shape == (h, w) else _resize_nearest(amap, h, w)
            t, above = _positions(m, scale)
            col = _colours(t, above)
            # Nothing far below the threshold, a faint tint just below it, warm above.
            alpha = np.where(above, 0.5 + 0.4 * (t - 0.5), np.maximum(t - 0.25, 0.0))
            alpha[np.isnan(m)] = 0.0
            f = bg.astype(np.float32)
            luma = f @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
            base = 0.8 * (0.5 * f + 0.5 * luma[..., None])  # dimmed, half desaturated
            a3 = alpha.astype(np.float32)[..., None]
            rgb = np.clip(np.rint(base * (1 - a3) + col * a3), 0, 255).astype(np.uint8)

    k = max(1, -(-min_side // min(h, w)))
    k = max(1, min(k, max(max_side, max(h, w)) // max(h, w)))
    big = _upscale(rgb, k)
    H, W = big.shape[:2]
    diag = math.sqrt(H * W)
    lw = max(1, round(diag / 320))
    font = _Font(max(12, round(diag / 42)))
    small = _Font(max(11, round(font.px * 0.8)))
    pad = max(2, font.px // 4)

    if nan_src is not None and nan_src.any():
        nan_big = _upscale(nan_src, k)
        cell = max(2, 2 * lw)
        yy, xx = np.indices((H, W))
        check = ((yy // cell + xx // cell) % 2).astype(bool)
        big[nan_big & check] = _NAN_RGB[0]
        big[nan_big & ~check] = _NAN_RGB[1]

    if mask is not None:
        mk = np.asarray(mask, dtype=bool)
        if mk.shape != (h, w):
            raise ValueError(
                f"mask must have shape {[h, w]} like the background, got {list(mk.shape)}"
            )
        edge = _dilate(mask_outline(_upscale(mk, k)), (lw - 1) // 2)
        big[edge] = outline_rgb

    boxes = [] if boxes_xyxy is None else [[float(v) for v in b] for b in boxes_xyxy]
    for i, b in enumerate(boxes):
        if len(b) != 4:
            raise ValueError(f"boxes_xyxy[{i}] must be [x1, y1, x2, y2], got {b}")
    for name, seq in (("scores", scores), ("areas", areas), ("severities", severities)):
        if seq is not None and len(seq) != len(boxes):
            raise ValueError(f"{name} must have one entry per box ({len(boxes)}), got {len(seq)}")

    # Boxes a little outside their region, so that they do not hide its outline.
    pic = Image.fromarray(big, mode="RGB")
    draw = ImageDraw.Draw(pic)
    margin = 2 * lw
    inset = max(1, lw // 2)
    disp = [
        [
            max(0, int(x1) * k - margin),
            max(0, int(y1) * k - margin),
            min(W - 1, (int(x2) + 1) * k - 1 + margin),
            min(H - 1, (int(y2) + 1) * k - 1 + margin),
        ]
        for x1, y1, x2, y2 in boxes
    ]
    for r in disp:  # a dark edge first: the box reads on bright and dark backgrounds
        draw.rectangle(r, outline=_EDGE_RGB, width=lw + 2 * inset)
    for r in disp:
        roomy = r[2] - r[0] > 2 * lw and r[3] - r[1] > 2 * lw
        inner = [r[0] + inset, r[1] + inset, r[2] - inset, r[3] - inset] if roomy else r
        draw.rectangle(inner, outline=box_rgb, width=lw)

    # The banner, the legend and the colour bar panel around the picture.
    n = len(boxes)
    ng = (n > 0) if defective is None else bool(defective)
    finite_scores = [float(v) for v in scores or () if v is not None and math.isfinite(float(v))]
    worst = max(finite_scores, default=None)
    line1: List[Tuple[str, Any]] = []
    if n:
        line1.append((f"{n} region{'s' if n != 1 else ''}", _TEXT_RGB))
        if worst is not None:
            line1.append((f"worst {_fmt(worst)}", _TEXT_RGB))
    else:
        line1.append(("no region", _TEXT_RGB))
        if map_max is not None:
            line1.append((f"map max {_fmt(map_max)}", _TEXT_RGB))
    if image_severity is not None:
        line1.append((f"severity {image_severity}", _TEXT_RGB))
    if image_score is not None:
        line1.append((f"image score {_fmt(float(image_score))}", _TEXT_RGB))
    if thr is not None:
        line1.append((f"threshold {_fmt(thr, 4)}", _TEXT_RGB))
    legend: List[Tuple[str, Any]] = []
    if n:
        sev = " | severity" if severities is not None else ""
        legend.append((f"tag: rank (1 = worst){sev} | max score | area", _DEFECT_RGB))
    if scale is not None:
        if bg is not None:
            text = "heat: faint just below the threshold, warm at/above it"
        else:
            text = "colours: dark below the threshold, warm at/above it"
        legend.append((text, (190, 190, 190)))
    if nan_src is not None and nan_src.any():
        legend.append(("grey squares: NaN (no score)", (190, 190, 190)))

    bar_w = max(8, font.px)
    ticks: List[str] = []
    if scale is not None:
        ticks = [_fmt(scale.hi), f"threshold {_fmt(scale.threshold, 4)}", _fmt(scale.lo)]
    elif amap is not None:
        ticks = [_fmt(vmax), _fmt(vmin)]
    panel_w = 0
    if ticks:
        label_w = max(small.width(s) for s in ticks + ["max " + _fmt(map_max)])
        panel_w = 3 * pad + bar_w + pad + 2 * lw + label_w + 2 * pad
    canvas_w = W + panel_w
    badge = font.width("NG") + 2 * pad
    header_lines = _flow(line1, font, max(1, canvas_w - badge - 4 * pad), font.px)
    legend_lines = _flow(legend, small, max(1, canvas_w - 2 * pad), small.px) if legend else []
    title_h = (small.height + pad) if title else 0
    banner_h = max(font.height + 2 * pad, len(header_lines) * (font.height + pad) + pad)
    header_h = pad + title_h + banner_h + pad + len(legend_lines) * (small.height + pad)
    # Room for the colour bar, and for a tag under a very flat picture.
    body_h = max(H, 6 * (small.height + pad) if ticks else 0, font.height + 2 * pad + 2)
    canvas = Image.new("RGB", (canvas_w, header_h + body_h), _PANEL_RGB)
    cd = ImageDraw.Draw(canvas)
    y = pad
    if title:
        small.draw(canvas, (pad, y), title, (200, 200, 200))
        y += small.height + pad
    badge_xyxy = [pad, y, pad + badge - 1, y + font.height + 2 * pad - 1]
    cd.rectangle(badge_xyxy, fill=_NG_RGB if ng else _OK_RGB)
    font.draw(canvas, (2 * pad, y + pad), "NG" if ng else "OK", (255, 255, 255))
    for j, line in enumerate(header_lines):
        for text, colour, x in line:
            font.draw(
                canvas, (badge + 3 * pad + x, y + pad + j * (font.height + pad)), text, colour
            )
    y += banner_h + pad
    for line in legend_lines:
        for text, colour, x in line:
            small.draw(canvas, (pad + x, y), text, colour)
        y += small.height + pad
    canvas.paste(pic, (0, header_h))

    # Rank tags, inside the picture (or the body, when the picture is too small for one).
    tags: List[Dict[str, Any]] = []
    placed: List[Sequence[float]] = []
    th = font.height + 2 * pad
    for i, r in enumerate(disp):
        rank = str(i + 1)
        rest = []
        if severities is not None:
            rest.append(str(severities[i]) if severities[i] is not None else "-")
        if scores is not None:
            rest.append(_fmt(float(scores[i])))
        if areas is not None:
            rest.append(f"{int(areas[i]):,} px")
        others = [o for j, o in enumerate(disp) if j != i]
        # Drop detail (the area, then the score ...) until the tag fits the width and
        # covers no tag placed before it; if none does, the fullest that covers least.
        choice = None
        while True:
            rest_text = "  ".join(rest)
            rw = font.width(rank) + 2 * pad
            tw = rw + (font.width(rest_text) + 2 * pad if rest_text else 0)
            if tw <= max(W, canvas_w if rw > W else 0) or not rest:
                area_w = W if tw <= W else canvas_w
                area_h = H if th <= H else body_h
                x, y, cover = _place((tw, th), r, (area_w, area_h), others, placed, gap=lw)
                if choice is None or cover < choice[0]:
                    choice = (cover, rest_text, rw, tw, x, y)
                if cover == 0.0:
                    break
            if not rest:
                break
            rest = rest[:-1]
        assert choice is not None
        _, rest_text, rw, tw, x, y = choice
        y += header_h
        cd.rectangle([x, y, x + rw - 1, y + th - 1], fill=box_rgb)
        font.draw(canvas, (x + pad, y + pad), rank, (0, 0, 0))
        if rest_text:
            cd.rectangle([x + rw, y, x + tw - 1, y + th - 1], fill=(0, 0, 0))
            font.draw(canvas, (x + rw + pad, y + pad), rest_text, box_rgb)
        placed.append((x, y - header_h, x + tw, y - header_h + th))
        tags.append({"rank": i + 1, "xyxy": [x, y, x + tw - 1, y + th - 1]})

    layout: Dict[str, Any] = {
        "picture": [0, header_h, W, H],
        "scale": k,
        "verdict": "NG" if ng else "OK",
        "badge": badge_xyxy,
        "tags": tags,
        "colorbar": None,
        "threshold_y": None,
        "scale_ends": None if scale is None else [scale.lo, scale.threshold, scale.hi],
    }
    if ticks:
        bx = W + 3 * pad
        by0 = header_h + small.height // 2 + pad
        by1 = header_h + body_h - small.height // 2 - pad - 1
        bh = by1 - by0 + 1
        pos = 1.0 - np.arange(bh) / max(bh - 1, 1)  # row j shows position 1 - j/(bh-1)
        if scale is not None:
            col = _colours(pos, pos >= 0.5, u8=True)
        else:
            col = _LUT[np.rint(pos * 255).astype(np.intp)]
        strip = np.ascontiguousarray(np.repeat(col[:, None, :], bar_w, axis=1))
        canvas.paste(Image.fromarray(strip, mode="RGB"), (bx, by0))
        cd.rectangle([bx - 1, by0 - 1, bx + bar_w, by1 + 1], outline=(160, 160, 160))
        lx = bx + bar_w + pad + 2 * lw

        def tick(yy: int, text: str, long: bool, colour: Tuple[int, int, int]) -> None:
            x0 = bx - (pad if long else 0)
            cd.line([x0, yy, bx + bar_w + pad, yy], fill=colour, width=lw if long else 1)
            ty = int(min(max(yy - small.height // 2, header_h), header_h + body_h - small.height))
            small.draw(canvas, (lx, ty), text, colour)

        tick(by0, ticks[0], False, _TEXT_RGB)
        tick(by1, ticks[-1], False, _TEXT_RGB)
        marks = [by0, by1]
        if scale is not None:
            ty = by0 + round(0.5 * (bh - 1))
            tick(ty, ticks[1], True, (255, 255, 255))
            layout["threshold_y"] = ty
            marks.append(ty)
        if map_max is not None:
            if scale is not None:
                tp, _ = _positions(np.array([[map_max]]), scale)
                p = float(tp[0, 0])
            else:
                assert vmin is not None and vmax is not None
                p = 1.0 if vmax <= vmin else min(max((map_max - vmin) / (vmax - vmin), 0.0), 1.0)
            my = by0 + round((1.0 - p) * (bh - 1))
            s = max(3, pad)
            cd.polygon(
                [(bx - 1, my), (bx - 1 - 2 * s, my - s), (bx - 1 - 2 * s, my + s)], fill=_DEFECT_RGB
            )
            # Its label only where it does not collide with the other ticks' labels.
            if all(abs(my - yy) > small.height for yy in marks):
                small.draw(
                    canvas, (lx, my - small.height // 2), "max " + _fmt(map_max), _DEFECT_RGB
                )
        layout["colorbar"] = [bx, by0, bar_w, bh]
    canvas.info["torchdefects.layout"] = layout
    return canvas


def _number_or_nan(v: Any) -> float:
    return float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else math.nan


def render_record(
    record: Dict[str, Any],
    image: Optional[np.ndarray] = None,
    anomaly_map: Optional[np.ndarray] = None,
    mask: Optional[np.ndarray] = None,
    **kwargs: Any,
) -> Image.Image:
    """:func:`render_overlay` for one ``results.jsonl`` record (see docs/schema.md).

    Takes the regions (in record order: rank 1 is the first), their ``score_max``,
    ``area`` and ``severity`` (when the run had ``severity_rules``), the threshold and its
    provenance, the image's ``label``, ``score`` and ``severity`` when the record has them,
    and the input's name as the title.

    Boxes: on an ``image`` whose size is the record's ``image_size``, the regions'
    ``bbox_xyxy_image``; otherwise ``bbox_xyxy`` (map pixels), and then the background
    must have the anomaly map's size. ``mask`` must be in the background's pixel space.

    Args:
        record: a result record (an error record raises ValueError).
        image: :math:`(H, W, 3)` the input image, or None to draw the map alone.
        anomaly_map: :math:`(h, w)` the map (blended over ``image`` when both are given).
        mask: :math:`(H, W)` bool, outlined.
        **kwargs: passed to :func:`render_overlay` (``min_side``, ``lo``, ``hi``, ...).

    Returns:
        An RGB :class:`PIL.Image.Image`.

    Example:
        >>> rec = {"input": "a.npy", "anomaly_map": {"shape": [4, 4]}, "defects": {
        ...     "pixel_threshold": 0.5, "regions": [
        ...         {"id": 1, "bbox_xyxy": [1, 1, 2, 2], "area": 4, "score_max": 0.9}]}}
        >>> m = np.zeros((4, 4)); m[1:3, 1:3] = 0.9
        >>> render_record(rec, anomaly_map=m, mask=m > 0.5).info["torchdefects.layout"]["verdict"]
        'NG'
    """
    if not isinstance(record, dict) or not isinstance(record.get("defects"), dict):
        raise ValueError(
            "record must be a result record with a 'defects' block, got "
            + (
                f"an error record for {record.get('input')!r}"
                if isinstance(record, dict)
                else type(record).__name__
            )
        )
    d = record["defects"]
    regions = [r for r in d.get("regions") or [] if isinstance(r, dict)]
    use_image_boxes = False
    if image is not None:
        size = record.get("image_size")
        hw = list(np.shape(image)[:2])
        map_shape = (record.get("anomaly_map") or {}).get("shape")
        if size is not None and hw == list(size) and all("bbox_xyxy_image" in r for r in regions):
            use_image_boxes = True
        elif regions and map_shape is not None and hw != list(map_shape):
            raise ValueError(
                f"image has shape {hw}, but the record's boxes are in anomaly-map pixels "
                f"{list(map_shape)} and it has no image-space boxes for image_size {size}"
            )
    label = record.get("label")
    defective = None
    if isinstance(label, (bool, int)):
        defective = bool(label)
    elif isinstance(label, str):
        defective = label.strip().lower() in ("ng", "1", "anomalous", "defective")
    score = record.get("score")
    opts: Dict[str, Any] = {
        "boxes_xyxy": [r["bbox_xyxy_image" if use_image_boxes else "bbox_xyxy"] for r in regions],
        "scores": [_number_or_nan(r.get("score_max")) for r in regions],
        "areas": [r.get("area", 0) for r in regions],
        "threshold": d.get("pixel_threshold"),
        "provenance": d.get("pixel_threshold_provenance"),
        "defective": defective,
        "image_score": score if isinstance(score, numbers.Real) and math.isfinite(score) else None,
        "title": str(record.get("input", "")) or None,
    }
    if "severity" in d:  # the config has severity_rules: tags and banner name the classes
        opts["severities"] = [r.get("severity") for r in regions]
        opts["image_severity"] = d.get("severity")
    opts.update(kwargs)
    return render_overlay(image=image, anomaly_map=anomaly_map, mask=mask, **opts)
