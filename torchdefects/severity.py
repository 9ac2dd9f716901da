"""Physical units and severity classes of regions.

- :func:`region_units`: ``area_mm2``, bbox and centroid in millimetres from ``pixel_size_mm``
  (the size of an original-image pixel) and the map-to-image scale.
- :func:`parse_severity_rules` (once, plain Python) and :func:`severity_classes` (per call,
  batched, scriptable): a region takes the first rule whose conditions all hold (class
  index ``0..N-1``) or none (``-1``); an image takes its most severe region's class (the
  lowest index), ``-1`` without one.
"""

import math
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from torchdefects.regions import Regions

__all__ = [
    "SEVERITY_KEYS",
    "RegionUnits",
    "SeverityRules",
    "parse_severity_rules",
    "region_units",
    "severity_classes",
    "severity_features",
]

# Conditions a rule may hold, each "feature >= value"; the column order of severity_features.
SEVERITY_KEYS: Tuple[str, ...] = (
    "min_area",
    "min_score_max",
    "min_score_mean",
    "min_area_mm2",
    "min_length_mm",
    "min_aspect_ratio",
)
_NEEDS_UNITS = ("min_area_mm2", "min_length_mm")


class RegionUnits(NamedTuple):
    """Region geometry in millimetres.

    Attributes:
        area_mm2: float64 :math:`(R,)`, ``area * mm_x * mm_y``.
        bbox_xyxy_mm: float64 :math:`(R, 4)`, the bbox's pixel edges
            ``[x1, y1, x2 + 1, y2 + 1] * [mm_x, mm_y, mm_x, mm_y]`` (plus the origin).
        centroid_xy_mm: float64 :math:`(R, 2)`, pixel centres: ``(c + 0.5) * mm`` (plus the
            origin).
        length_mm: float64 :math:`(R,)`, the longer bbox side in mm.
    """

    area_mm2: Tensor
    bbox_xyxy_mm: Tensor
    centroid_xy_mm: Tensor
    length_mm: Tensor


def region_units(
    regions: Regions,
    pixel_size_mm: float,
    map_to_image: Tuple[float, float] = (1.0, 1.0),
    origin_xy: Tuple[float, float] = (0.0, 0.0),
) -> RegionUnits:
    r"""Area, bbox and centroid of regions in millimetres.

    A map pixel covers ``map_to_image = (sx, sy)`` original-image pixels (``sx = image width
    / map width`` for a plain resize), each ``pixel_size_mm`` wide and high, so a map pixel
    is ``mm_x = pixel_size_mm * sx`` by ``mm_y = pixel_size_mm * sy``.

    Args:
        regions: :class:`~torchdefects.Regions`.
        pixel_size_mm: size of an original-image pixel in mm, ``> 0``.
        map_to_image: ``(sx, sy)``, both ``> 0``.
        origin_xy: where the map's top-left corner lies in the original image, in image
            pixels (not 0 for a center crop: :meth:`~torchdefects.geometry.ImageSpace.affine_xy`);
            it shifts ``bbox_xyxy_mm`` and ``centroid_xy_mm``, not the sizes.

    Example:
        >>> from torchdefects import connected_components, region_stats
        >>> mask = torch.tensor([[[1, 1, 0], [1, 1, 0]]])
        >>> labels, counts = connected_components(mask)
        >>> region_units(region_stats(labels, counts), 0.1, (2.0, 2.0)).area_mm2
        tensor([0.1600], dtype=torch.float64)
    """
    sx, sy = float(map_to_image[0]), float(map_to_image[1])
    ox, oy = float(origin_xy[0]), float(origin_xy[1])
    for name, v in (
        ("pixel_size_mm", pixel_size_mm),
        ("map_to_image[0]", sx),
        ("map_to_image[1]", sy),
    ):
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {v}")
    for name, v in (("origin_xy[0]", ox), ("origin_xy[1]", oy)):
        if not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v}")
    n = regions.area.shape[0]
    dev = regions.area.device
    mm = torch.tensor(
        [pixel_size_mm * sx, pixel_size_mm * sy], dtype=torch.float64, device=dev
    ).expand(n, 2)
    area_mm2, edges, length = _mm_geometry(regions.area, regions.bbox_xyxy, mm)
    origin = torch.tensor([ox * pixel_size_mm, oy * pixel_size_mm], dtype=torch.float64, device=dev)
    centroid = (regions.centroid_xy.to(torch.float64) + 0.5) * mm
    if ox != 0.0 or oy != 0.0:
        edges = edges + origin.repeat(2)
        centroid = centroid + origin
    return RegionUnits(
        area_mm2=area_mm2, bbox_xyxy_mm=edges, centroid_xy_mm=centroid, length_mm=length
    )


def _mm_geometry(area: Tensor, bbox_xyxy: Tensor, mm_xy: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``(area_mm2, bbox edges in mm (R, 4), length_mm)`` from a map pixel's size per region.

    The one formula of millimetre geometry (scriptable, exportable): :func:`region_units`
    and the head's severity features both use it, so their values are bit-equal.
    ``mm_xy``: float64 :math:`(R, 2)`, ``[mm_x, mm_y]`` of a map pixel of each region.
    """
    box = bbox_xyxy.to(torch.float64)
    mx = mm_xy[:, 0]
    my = mm_xy[:, 1]
    x1, y1, x2, y2 = box[:, 0] * mx, box[:, 1] * my, (box[:, 2] + 1) * mx, (box[:, 3] + 1) * my
    edges = torch.stack([x1, y1, x2, y2], 1)
    length = torch.maximum(edges[:, 2] - edges[:, 0], edges[:, 3] - edges[:, 1])
    return area.to(torch.float64) * (mx * my), edges, length


class SeverityRules(NamedTuple):
    """Parsed severity rules.

    Attributes:
        names: the class names, in rule order (class ``i`` is ``names[i]``).
        thresholds: float64 :math:`(N, C)`, the value of each condition (``C =
            len(SEVERITY_KEYS)``), 0 where a rule has none.
        active: bool :math:`(N, C)`, which conditions each rule holds.
    """

    names: List[str]
    thresholds: Tensor
    active: Tensor


def parse_severity_rules(rules: Sequence[Any], has_units: bool = True) -> SeverityRules:
    """Check and tabulate an ordered list of rules such as ``[{"name": "critical",
    "min_area_mm2": 0.5}, {"name": "minor", "min_score_max": 0.7}]``.

    Each rule is a dict with a non-empty, unique ``name`` and any of :data:`SEVERITY_KEYS`
    (finite numbers); a rule without conditions matches every region. Millimetre conditions
    need ``pixel_size_mm`` (``has_units``).

    Example:
        >>> r = parse_severity_rules([{"name": "critical", "min_area": 50}, {"name": "minor"}])
        >>> r.names, r.active[:, 0]
        (['critical', 'minor'], tensor([ True, False]))
    """
    if isinstance(rules, (str, bytes, dict)) or not isinstance(rules, (list, tuple)):
        raise TypeError(f"severity_rules must be a list of rules, got {type(rules).__name__}")
    names: List[str] = []
    thr = torch.zeros(len(rules), len(SEVERITY_KEYS), dtype=torch.float64)
    active = torch.zeros(len(rules), len(SEVERITY_KEYS), dtype=torch.bool)
    for i, rule in enumerate(rules):
        where = f"severity_rules[{i}]"
        if not isinstance(rule, dict):
            raise TypeError(f"{where} must be a dict, got {type(rule).__name__}")
        name = rule.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError(f"{where}.name must be a non-empty string, got {name!r}")
        if name in names:
            raise ValueError(f"{where}.name {name!r} is used by an earlier rule")
        names.append(name)
        for key, value in rule.items():
            if key == "name":
                continue
            if key not in SEVERITY_KEYS:
                raise ValueError(
                    f"{where} has unknown condition {key!r}; expected one of "
                    + ", ".join(SEVERITY_KEYS)
                )
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):
                raise ValueError(f"{where}.{key} must be a finite number, got {value!r}")
            if key in _NEEDS_UNITS and not has_units:
                raise ValueError(f"{where}.{key} needs pixel_size_mm to be set")
            c = SEVERITY_KEYS.index(key)
            thr[i, c] = float(value)
            active[i, c] = True
    return SeverityRules(names=names, thresholds=thr, active=active)


def severity_features(
    regions: Regions,
    area_mm2: Optional[Tensor] = None,
    length_mm: Optional[Tensor] = None,
    aspect_ratio: Optional[Tensor] = None,
) -> Tensor:
    """The per-region values the rules test, float64 :math:`(R, C)` in :data:`SEVERITY_KEYS` order.

    Missing inputs are NaN columns (a rule testing them never matches).

    Example:
        >>> from torchdefects import connected_components, region_stats
        >>> mask = torch.tensor([[[1, 1, 0, 1]]])
        >>> labels, counts = connected_components(mask)
        >>> severity_features(region_stats(labels, counts))[:, 0]
        tensor([2., 1.], dtype=torch.float64)
    """
    n = regions.area.shape[0]
    dev = regions.area.device
    nan = torch.full((n,), float("nan"), dtype=torch.float64, device=dev)
    cols = [
        regions.area.to(torch.float64),
        regions.score_max.to(torch.float64),
        regions.score_mean.to(torch.float64),
        nan if area_mm2 is None else area_mm2.to(torch.float64),
        nan if length_mm is None else length_mm.to(torch.float64),
        nan if aspect_ratio is None else aspect_ratio.to(torch.float64),
    ]
    return torch.stack(cols, 1)


def _feature_table(
    area: Tensor,
    bbox_xyxy: Tensor,
    score_max: Tensor,
    score_mean: Tensor,
    mm_xy: Optional[Tensor],
    columns: List[int],
) -> Tensor:
    """The ``columns`` of :func:`severity_features` from plain tensors (the head's form:
    scriptable, exportable, only the columns some rule tests).

    ``mm_xy``: float64 :math:`(R, 2)`, a map pixel's size in mm per region, or None (the mm
    columns are NaN). The aspect ratio is :func:`~torchdefects.shape_stats`' formula.
    Returns float64 :math:`(R, len(columns))`.
    """
    n = area.shape[0]
    f64 = torch.float64
    nan = torch.full((n,), float("nan"), dtype=f64, device=area.device)
    area_mm2 = nan
    length_mm = nan
    if mm_xy is not None and (3 in columns or 4 in columns):
        area_mm2, _, length_mm = _mm_geometry(area, bbox_xyxy, mm_xy)
    cols: List[Tensor] = []
    for c in columns:
        if c == 0:
            cols.append(area.to(f64))
        elif c == 1:
            cols.append(score_max.to(f64))
        elif c == 2:
            cols.append(score_mean.to(f64))
        elif c == 3:
            cols.append(area_mm2)
        elif c == 4:
            cols.append(length_mm)
        else:
            w = (bbox_xyxy[:, 2] - bbox_xyxy[:, 0] + 1).to(f64)
            h = (bbox_xyxy[:, 3] - bbox_xyxy[:, 1] + 1).to(f64)
            cols.append(torch.maximum(w / h, h / w))
    if len(cols) == 0:
        return torch.zeros(n, 0, dtype=f64, device=area.device)
    return torch.stack(cols, 1)


def _first_rule(features: Tensor, thresholds: Tensor, active: Tensor) -> Tensor:
    """Index of the first rule all of whose conditions hold per row, ``N`` for none: int64 (R,)."""
    n_rules = thresholds.shape[0]
    r = features.shape[0]
    dev = features.device
    if n_rules == 0:
        return torch.zeros(r, dtype=torch.int64, device=dev)
    # A NaN feature fails ">=", so a rule testing a missing column never holds.
    holds = features.unsqueeze(1) >= thresholds.to(dev).unsqueeze(0)
    match = (holds | ~active.to(dev).unsqueeze(0)).all(2)  # (R, N)
    rank = torch.arange(n_rules, device=dev).expand(r, n_rules)
    return torch.where(match, rank, n_rules).amin(1)


def severity_classes(
    features: Tensor, thresholds: Tensor, active: Tensor, batch_index: Tensor, num_images: int
) -> Tuple[Tensor, Tensor]:
    r"""Severity class of each region and image (scriptable, exportable, no host sync).

    Args:
        features: float64 :math:`(R, C)` from :func:`severity_features`.
        thresholds: float64 :math:`(N, C)`, :attr:`SeverityRules.thresholds`.
        active: bool :math:`(N, C)`, :attr:`SeverityRules.active`.
        batch_index: int64 :math:`(R,)`.
        num_images: ``B``.

    Returns:
        ``(region_class, image_class)``: int64 :math:`(R,)` and :math:`(B,)`, rule index or -1.

    Example:
        >>> rules = parse_severity_rules([{"name": "big", "min_area": 3}, {"name": "any"}])
        >>> feats = torch.tensor([[5.0] + [0.0] * 5, [1.0] + [0.0] * 5], dtype=torch.float64)
        >>> severity_classes(feats, rules.thresholds, rules.active, torch.tensor([0, 1]), 3)
        (tensor([0, 1]), tensor([ 0,  1, -1]))
    """
    n_rules = thresholds.shape[0]
    dev = features.device
    first = _first_rule(features, thresholds, active)
    region_class = torch.where(first >= n_rules, -1, first)
    image = torch.full((num_images,), n_rules, dtype=torch.int64, device=dev)
    image = image.scatter_reduce(0, batch_index.to(dev), first, reduce="amin")
    image_class = torch.where(image >= n_rules, -1, image)
    return region_class, image_class
