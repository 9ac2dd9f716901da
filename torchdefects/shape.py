"""Shape statistics of regions, with pyimgano's definitions.

- :func:`shape_stats`: ``bbox_area``, ``fill_ratio``, ``aspect_ratio`` from the
  :class:`~torchdefects.Regions` columns alone: batched, exact, scriptable, exportable.
- :func:`solidity`: outer-contour polygon area over convex-hull area, equal to
  ``cv2.findContours(RETR_EXTERNAL) + cv2.convexHull + cv2.contourArea`` on the region alone
  (pyimgano's rule). The contour area is batched on the device; the hull is built on the host
  (NumPy, exact integer arithmetic), so this one is host-side and is not part of exported
  graphs: call it for the candidate regions only, when a filter or a record needs it.

How the contour area is computed without tracing: OpenCV traces the outer boundary of an
8-connected region through pixel centres, holes ignored. That polygon covers, in each 2x2
block of pixel centres of the region with its holes filled, the whole unit square when the
four pixels are in (area 1), a half-square triangle when three are (the contour cuts the
corner diagonally) and nothing otherwise (edges and diagonal steps have no area). So the
area is ``#blocks(4) + #blocks(3) / 2``, exactly (multiples of 1/2). The convex hull of the
contour is the hull of the pixel centres, which is the hull of each row's leftmost and
rightmost pixels.
"""

from typing import List, NamedTuple

import numpy as np
import torch
from torch import Tensor

from torchdefects._check import _as_bhw
from torchdefects.morphology import fill_holes
from torchdefects.regions import Regions

__all__ = ["ShapeStats", "shape_stats", "solidity"]


class ShapeStats(NamedTuple):
    """Shape statistics per region (pyimgano's names and definitions).

    Attributes:
        bbox_area: int64 :math:`(R,)`, ``width * height`` of the inclusive bbox.
        fill_ratio: float64 :math:`(R,)`, ``area / bbox_area``.
        aspect_ratio: float64 :math:`(R,)`, ``max(width / height, height / width)`` (>= 1).
    """

    bbox_area: Tensor
    fill_ratio: Tensor
    aspect_ratio: Tensor


def shape_stats(regions: Regions) -> ShapeStats:
    r"""``bbox_area``, ``fill_ratio`` and ``aspect_ratio`` of every region, as pyimgano.

    Regions always have width and height >= 1, so pyimgano's zero-size branches
    (``fill_ratio`` 0, ``aspect_ratio`` inf) never apply. pyimgano rounds the ratios to 6
    decimals in its records; these are not rounded.

    Args:
        regions: :class:`~torchdefects.Regions` (any order, any subset).

    Returns:
        :class:`ShapeStats`, one row per region.

    Example:
        >>> from torchdefects import connected_components, region_stats
        >>> mask = torch.tensor([[[1, 1, 1, 0], [1, 0, 0, 0]]])
        >>> labels, counts = connected_components(mask)
        >>> s = shape_stats(region_stats(labels, counts))
        >>> s.bbox_area, s.fill_ratio, s.aspect_ratio
        (tensor([6]), tensor([0.6667], dtype=torch.float64), tensor([1.5000], dtype=torch.float64))
    """
    box = regions.bbox_xyxy
    width = box[:, 2] - box[:, 0] + 1
    height = box[:, 3] - box[:, 1] + 1
    bbox_area = width * height
    fill = regions.area.to(torch.float64) / bbox_area.to(torch.float64)
    wf = width.to(torch.float64)
    hf = height.to(torch.float64)
    aspect = torch.maximum(wf / hf, hf / wf)
    return ShapeStats(bbox_area=bbox_area, fill_ratio=fill, aspect_ratio=aspect)


def _twice_hull_area(xmin: np.ndarray, xmax: np.ndarray) -> int:
    """Twice the area of the convex hull of the points (xmin[i], i) and (xmax[i], i)."""
    pts: List[tuple] = []
    for y in range(xmin.shape[0]):
        if xmin[y] >= 0:
            pts.append((int(xmin[y]), y))
            if xmax[y] != xmin[y]:
                pts.append((int(xmax[y]), y))
    pts.sort()
    if len(pts) < 3:
        return 0

    def cross(o: tuple, a: tuple, b: tuple) -> int:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: List[tuple] = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: List[tuple] = []
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    hull = lower[:-1] + upper[:-1]
    twice = 0
    for i in range(len(hull)):
        x1, y1 = hull[i]
        x2, y2 = hull[(i + 1) % len(hull)]
        twice += x1 * y2 - x2 * y1
    return abs(twice)


def solidity(labels: Tensor, regions: Regions, chunk: int = 64) -> Tensor:
    r"""Solidity of each region: outer-contour area / convex-hull area, as pyimgano (OpenCV).

    Equals, for each region, ``cv2.contourArea(c) / cv2.contourArea(cv2.convexHull(c))``
    with ``c`` the external contour of the region's pixels alone
    (``cv2.findContours(RETR_EXTERNAL, CHAIN_APPROX_SIMPLE)``). Both areas are exact
    multiples of 1/2; the ratio is one float64 division. A region whose pixel centres are
    collinear (one pixel, a straight or diagonal line) has hull area 0: its solidity is NaN
    (pyimgano records ``None`` and its ``min_solidity`` filter drops the region; a NaN fails
    every ``>=`` test, so the same happens with :func:`~torchdefects.region_keep`).

    Host-side: one read-back of the largest bbox per chunk and a hull per region in Python;
    not scriptable or exportable. Regions are processed ``chunk`` at a time on crops of their
    bboxes (memory ``chunk * max_h * max_w`` per chunk).

    Args:
        labels: int :math:`(B, 1, H, W)` or :math:`(B, H, W)`, the label map ``regions``
            describes (each region's pixels are those of its image equal to its ``label``).
        regions: :class:`~torchdefects.Regions`, any order or subset.
        chunk: regions per crop batch.

    Returns:
        float64 :math:`(R,)` on the regions' device.

    Example:
        >>> from torchdefects import connected_components, region_stats
        >>> mask = torch.tensor([[[1, 1, 1], [1, 0, 0], [1, 0, 0]]])
        >>> labels, counts = connected_components(mask)
        >>> solidity(labels, region_stats(labels, counts))
        tensor([0.2500], dtype=torch.float64)
        >>> mask = torch.tensor([[[1, 1, 1], [1, 1, 0], [1, 0, 0]]])
        >>> labels, counts = connected_components(mask)
        >>> solidity(labels, region_stats(labels, counts))
        tensor([1.], dtype=torch.float64)
    """
    if chunk < 1:
        raise ValueError(f"chunk must be an integer >= 1, got {chunk}")
    lab = _as_bhw(labels, "labels")
    device = lab.device
    h, w = lab.shape[1], lab.shape[2]
    num = regions.area.shape[0]
    out = torch.full((num,), float("nan"), dtype=torch.float64)
    flat = lab.reshape(-1)
    for s in range(0, num, chunk):
        e = min(num, s + chunk)
        box = regions.bbox_xyxy[s:e].to(device)
        bi = regions.batch_index[s:e].to(device)
        want = regions.label[s:e].to(device=device, dtype=lab.dtype)
        # One pixel of background around each crop, so the outside is one component.
        ch = int((box[:, 3] - box[:, 1]).max()) + 3
        cw = int((box[:, 2] - box[:, 0]).max()) + 3
        ys = box[:, 1].view(-1, 1, 1) - 1 + torch.arange(ch, device=device).view(1, ch, 1)
        xs = box[:, 0].view(-1, 1, 1) - 1 + torch.arange(cw, device=device).view(1, 1, cw)
        valid = (ys >= box[:, 1].view(-1, 1, 1)) & (ys <= box[:, 3].view(-1, 1, 1))
        valid = valid & (xs >= box[:, 0].view(-1, 1, 1)) & (xs <= box[:, 2].view(-1, 1, 1))
        pos = (bi.view(-1, 1, 1) * h + ys.clamp(0, h - 1)) * w + xs.clamp(0, w - 1)
        crop = valid & (
            flat.index_select(0, pos.reshape(-1)).view(pos.shape) == want.view(-1, 1, 1)
        )
        filled = fill_holes(crop).to(torch.int32)
        blocks = filled[:, :-1, :-1] + filled[:, 1:, :-1] + filled[:, :-1, 1:] + filled[:, 1:, 1:]
        twice_contour = (2 * (blocks == 4).sum((1, 2)) + (blocks == 3).sum((1, 2))).cpu()
        cols = torch.arange(cw, device=device).view(1, 1, cw)
        big = cw + 1
        xmin = torch.where(crop, cols, big).amin(2)
        xmax = torch.where(crop, cols, -1).amax(2)
        xmin = torch.where(xmin == big, -1, xmin).cpu().numpy()
        xmax = xmax.cpu().numpy()
        for i in range(e - s):
            hull2 = _twice_hull_area(xmin[i], xmax[i])
            if hull2 > 0:
                out[s + i] = float(twice_contour[i]) / float(hull2)
    return out.to(regions.area.device)
