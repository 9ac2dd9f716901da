"""Mask dilation by OpenCV's elliptic structuring element (pyimgano's ``mask_dilate_ksize``).

pyimgano dilates the final mask with ``cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))``
and ``cv2.dilate``; :func:`dilate_ellipse` is bit-equal to that, batched on the device.

The element is a union of a few centred rectangles (one per distinct row width: the rows at
least that wide are consecutive), and dilation by a union is the OR of the dilations by its
parts; each rectangle dilates separably, by OR-windows along rows then columns built from
windows of 1, 2, 4, ... pixels. For ``k = 5`` that is about ten boolean ops on the batch.
"""

import math
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from torchdefects._check import _as_b1hw, _check_bool_mask

__all__ = ["dilate_ellipse", "ellipse_kernel"]


def _round_half_even(v: float) -> int:
    """``lrint`` under the default rounding mode (half to even), for ``v >= 0``."""
    f = math.floor(v)
    d = v - f
    if d > 0.5 or (d == 0.5 and f % 2 == 1):
        return f + 1
    return f


def _row_spans(ksize: int) -> List[Tuple[int, int]]:
    """Column span ``[lo, hi)`` of each row of the elliptic element (OpenCV's rule)."""
    r = ksize // 2
    c = ksize // 2
    inv_r2 = 1.0 / (r * r) if r > 0 else 0.0
    spans: List[Tuple[int, int]] = []
    for i in range(ksize):
        dy = i - r
        dx = _round_half_even(c * math.sqrt((r * r - dy * dy) * inv_r2))
        spans.append((max(c - dx, 0), min(c + dx + 1, ksize)))
    return spans


def _rectangles(ksize: int) -> List[Tuple[int, int, int, int]]:
    """The element as a union of rectangles ``(row0, rows, col0, cols)``, one per distinct row
    span: the rows whose span holds it. Spans widen towards the centre row, so those rows are
    consecutive and each row lies in the rectangle of its own span (checked here)."""
    spans = _row_spans(ksize)
    rects: List[Tuple[int, int, int, int]] = []
    seen: List[int] = []  # lo * (ksize + 1) + hi
    for lo, hi in spans:
        if lo * (ksize + 1) + hi in seen:
            continue
        seen.append(lo * (ksize + 1) + hi)
        rows: List[int] = []
        for i in range(ksize):
            if spans[i][0] <= lo and spans[i][1] >= hi:
                rows.append(i)
        if rows[-1] - rows[0] + 1 != len(rows):
            raise RuntimeError(f"elliptic element {ksize}: rows of span {lo}..{hi} not consecutive")
        rects.append((rows[0], len(rows), lo, hi - lo))
    return rects


def ellipse_kernel(ksize: int) -> Tensor:
    """``cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (ksize, ksize))`` as a bool :math:`(k, k)`.

    Row ``i`` holds columns ``c - dx .. c + dx`` with ``r = c = ksize // 2``,
    ``dy = i - r`` and ``dx = round(c * sqrt((r*r - dy*dy) / (r*r)))`` (half to even, as
    OpenCV's ``saturate_cast``), clipped to the kernel.

    Example:
        >>> ellipse_kernel(5).int()
        tensor([[0, 0, 1, 0, 0],
                [1, 1, 1, 1, 1],
                [1, 1, 1, 1, 1],
                [1, 1, 1, 1, 1],
                [0, 0, 1, 0, 0]], dtype=torch.int32)
    """
    if ksize < 1:
        raise ValueError(f"ksize must be an integer >= 1, got {ksize}")
    cols = torch.arange(ksize)
    rows: List[Tensor] = []
    for lo, hi in _row_spans(ksize):
        rows.append((cols >= lo) & (cols < hi))
    return torch.stack(rows, 0)


def _or_levels(x: Tensor, size: int, step: int) -> List[Tensor]:
    """``levels[j][i] = OR of x[i + t * step]`` for ``t < 2**j``, for ``2**j <= size``."""
    levels: List[Tensor] = [x]
    s = 1
    while 2 * s <= size:
        a = levels[-1]
        m = a.shape[1] - s * step
        levels.append(a.narrow(1, 0, m) | a.narrow(1, s * step, m))
        s = 2 * s
    return levels


def _or_window(levels: List[Tensor], size: int, offset: int, step: int, n: int) -> Tensor:
    """``OR of x[i + (offset + t) * step]`` for ``t < size``, ``i < n``: two windows of the
    largest power of two ``p <= size``, at ``offset`` and ``offset + size - p``."""
    j = 0
    while (2 << j) <= size:
        j += 1
    p = 1 << j
    out = levels[j].narrow(1, offset * step, n)
    if p < size:
        out = out | levels[j].narrow(1, (offset + size - p) * step, n)
    return out


def dilate_ellipse(mask: Tensor, ksize: int) -> Tensor:
    r"""Dilate masks by the elliptic ``ksize x ksize`` element: ``cv2.dilate`` bit for bit.

    Pixels outside the image count as background (OpenCV's default border for dilation).
    The anchor is the kernel centre ``(ksize // 2, ksize // 2)``, for even sizes too.

    Args:
        mask: bool :math:`(B, 1, H, W)` or :math:`(B, H, W)`.
        ksize: kernel size; ``0`` or ``1`` returns the mask unchanged.

    Returns:
        bool tensor of the mask's shape.

    Example:
        >>> m = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
        >>> m[0, 0, 2, 2] = True
        >>> dilate_ellipse(m, 3)[0, 0].int()
        tensor([[0, 0, 0, 0, 0],
                [0, 0, 1, 0, 0],
                [0, 1, 1, 1, 0],
                [0, 0, 1, 0, 0],
                [0, 0, 0, 0, 0]], dtype=torch.int32)
    """
    _check_bool_mask(mask, "mask")
    if ksize < 0:
        raise ValueError(f"ksize must be an integer >= 0, got {ksize}")
    if ksize <= 1 or mask.numel() == 0:
        return mask
    x = _as_b1hw(mask, "mask")
    b, h, w = x.shape[0], x.shape[2], x.shape[3]
    a = ksize // 2
    # Outside is background; one more bottom row keeps the last rows' slices in bounds.
    # Flat per image: a shift by j columns is offset j, by i rows offset i * wp.
    padded = F.pad(x, [a, ksize - 1 - a, a, ksize - a])
    wp = padded.shape[3]
    flat = padded.reshape(b, padded.shape[2] * wp)
    n = h * wp
    rows_n = (h + ksize - 1) * wp
    rects = _rectangles(ksize)
    max_cols = 1
    for rect in rects:
        max_cols = max(max_cols, rect[3])
    col_levels = _or_levels(flat, max_cols, 1)
    out = torch.zeros(0, dtype=torch.bool)
    first = True
    for row0, n_rows, col0, n_cols in rects:
        along = _or_window(col_levels, n_cols, col0, 1, rows_n)
        part = _or_window(_or_levels(along, n_rows, wp), n_rows, row0, wp, n)
        if first:
            out = part
            first = False
        else:
            out = out | part
    return out.reshape(b, 1, h, wp).narrow(3, 0, w).contiguous().view(mask.shape)
