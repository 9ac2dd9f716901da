"""``extract_defects``: one (H, W) map in, pyimgano's defects dict out, computed by the head.

For code written against pyimgano's ``extract_defects_from_anomaly_map``: the same keyword
names and the same dict layout, computed by :class:`~torchdefects.DefectHead` (so the
numbers are the head's; the differences are listed in ``docs/pyimgano.md``).
"""

import math
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from torchdefects.config import DefectsConfig

__all__ = ["extract_defects"]


def _as_map(anomaly_map: Any) -> Tensor:
    if isinstance(anomaly_map, Tensor):
        x = anomaly_map
    elif isinstance(anomaly_map, np.ndarray):
        a = anomaly_map
        if not np.issubdtype(a.dtype, np.floating):
            if not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
                raise TypeError(
                    f"anomaly_map must be a float NumPy array or tensor, got dtype {a.dtype}"
                )
            a = a.astype(np.float32)  # as pyimgano does
        x = torch.from_numpy(np.ascontiguousarray(a))
    else:
        raise TypeError(
            "anomaly_map must be a NumPy array or a torch.Tensor of shape (H, W), got "
            f"{type(anomaly_map).__name__}"
        )
    if x.dim() != 2:
        raise ValueError(f"anomaly_map must be 2D (H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.to(torch.float32)
    return x


def _num(v: float) -> Optional[float]:
    return v if math.isfinite(v) else None


def extract_defects(
    anomaly_map: Union[np.ndarray, Tensor],
    *,
    pixel_threshold: float,
    roi_xyxy_norm: Optional[Sequence[float]] = None,
    open_ksize: int = 0,
    close_ksize: int = 0,
    fill_holes: bool = False,
    min_area: int = 0,
    max_regions: Optional[int] = None,
    connectivity: int = 8,
    map_to_image: Optional[Sequence[float]] = None,
    **pyimgano_options: Any,
) -> Dict[str, Any]:
    """Defects of one anomaly map, in pyimgano's ``extract_defects_from_anomaly_map`` layout.

    Args:
        anomaly_map: :math:`(H, W)` NumPy array or tensor (any device); float maps keep their
            dtype (float64 compares in float64), integer and bool maps become float32.
        pixel_threshold: a pixel ``>=`` this is foreground.
        roi_xyxy_norm, open_ksize, close_ksize, fill_holes, min_area, max_regions,
            connectivity: as in :class:`~torchdefects.DefectsConfig`.
        **pyimgano_options: pyimgano's other keywords (``mask_space``,
            ``border_ignore_px``, ``map_smoothing_method``, ``hysteresis_enabled``,
            ``min_score_max``, ``max_regions_sort_by`` ...) under their
            :class:`~torchdefects.DefectsConfig` names, run by the head (docs/postprocessing.md);
            validated there (``mask_space="full"``: ``"mask"`` is the whole map's mask, the
            regions stay ROI-gated; see :class:`~torchdefects.DefectHead`), and
            ``pixel_size_mm`` and ``severity_rules`` (torchdefects' own).
        map_to_image: ``(sx, sy)``, the original-image pixels a map pixel spans (default
            ``(1, 1)``); with ``pixel_size_mm`` a map pixel is ``pixel_size_mm * (sx, sy)`` mm.

    Returns:
        ``{"space": {"type": "anomaly_map", "shape": [H, W]}, "pixel_threshold": float,
        "mask": uint8 (H, W) NumPy array of 0/255, "regions": [...],
        "map_stats_roi": {"max": float, "mean": float}}``. Each region is
        ``{"id", "bbox_xyxy" (inclusive [x1, y1, x2, y2]), "area", "centroid_xy" ([x, y]),
        "score_max", "score_mean", "bbox_area", "fill_ratio", "aspect_ratio"}`` (plus
        ``"solidity"`` with ``min_solidity``, ``None`` where undefined, and
        ``"merged_from_ids"`` with merging; ``"area_mm2"``, ``"bbox_xyxy_mm"`` and
        ``"centroid_xy_mm"`` with ``pixel_size_mm``, as :func:`~torchdefects.region_units`;
        ``"severity"``, the rule's name or ``None``, with ``severity_rules``, which also add
        the image's ``"severity"`` to the dict) in the head's order (``max_regions_sort_by`` desc,
        then ``score_max`` desc, ``area`` desc, ``id`` asc); ``id`` is the SciPy raster
        label. Scores are not rounded; a ROI with no finite pixel gives ``null`` stats
        (pyimgano: 0.0).

    Raises:
        TypeError, ValueError: a bad map or option; the message names it.

    Example:
        >>> m = np.zeros((4, 6), np.float32); m[1:3, 2:4] = 0.9
        >>> out = extract_defects(m, pixel_threshold=0.5)
        >>> out["regions"][0]["bbox_xyxy"], out["regions"][0]["area"], int(out["mask"].max())
        ([2, 1, 3, 2], 4, 255)
    """
    from torchdefects.head import DefectHead

    x = _as_map(anomaly_map)
    config = DefectsConfig(
        pixel_threshold=pixel_threshold,
        roi_xyxy_norm=None if roi_xyxy_norm is None else list(roi_xyxy_norm),
        open_ksize=open_ksize,
        close_ksize=close_ksize,
        fill_holes=fill_holes,
        min_area=min_area,
        max_regions=max_regions,
        connectivity=connectivity,
        **pyimgano_options,
    )
    head = DefectHead(config).to(x.device)
    h, w = int(x.shape[0]), int(x.shape[1])
    with torch.no_grad():
        out = head(x.reshape(1, 1, h, w), map_to_image=map_to_image)
    mask = out.mask[0, 0].to("cpu").numpy().astype(np.uint8) * np.uint8(255)
    r = out.regions
    labels = r.label.tolist()
    areas = r.area.tolist()
    boxes = r.bbox_xyxy.tolist()
    cents = r.centroid_xy.to(torch.float64).tolist()
    smax = r.score_max.to(torch.float64).tolist()
    smean = r.score_mean.to(torch.float64).tolist()
    sol = None if out.solidity is None else out.solidity.tolist()
    members: Optional[List[List[int]]] = None
    if out.merged_from is not None:
        members = [[] for _ in labels]
        for row, member in out.merged_from.tolist():
            members[row].append(int(member))
    units = None
    if config.pixel_size_mm is not None:
        from torchdefects.severity import region_units

        scale = (1.0, 1.0) if map_to_image is None else tuple(map_to_image)
        u = region_units(r, config.pixel_size_mm, (float(scale[0]), float(scale[1])))
        units = (u.area_mm2.tolist(), u.bbox_xyxy_mm.tolist(), u.centroid_xy_mm.tolist())
    names = [rule["name"] for rule in config.severity_rules or []]
    sev = None if out.severity is None else out.severity.tolist()
    regions: List[Dict[str, Any]] = []
    for i, label in enumerate(labels):
        x1, y1, x2, y2 = (int(v) for v in boxes[i])
        bw, bh = x2 - x1 + 1, y2 - y1 + 1
        area = int(areas[i])
        regions.append(
            {
                "id": int(label),
                "bbox_xyxy": [x1, y1, x2, y2],
                "area": area,
                "centroid_xy": [float(cents[i][0]), float(cents[i][1])],
                "score_max": _num(float(smax[i])),
                "score_mean": _num(float(smean[i])),
                "bbox_area": bw * bh,
                "fill_ratio": area / (bw * bh),
                "aspect_ratio": max(bw / bh, bh / bw),
            }
        )
        if sol is not None:
            regions[-1]["solidity"] = _num(float(sol[i]))
        if members is not None:
            regions[-1]["merged_from_ids"] = members[i]
        if units is not None:
            regions[-1]["area_mm2"] = units[0][i]
            regions[-1]["bbox_xyxy_mm"] = units[1][i]
            regions[-1]["centroid_xy_mm"] = units[2][i]
        if sev is not None:
            regions[-1]["severity"] = names[sev[i]] if sev[i] >= 0 else None
    result = {
        "space": {"type": "anomaly_map", "shape": [h, w]},
        "pixel_threshold": float(config.pixel_threshold),  # type: ignore[arg-type]
        "mask": mask,
        "regions": regions,
        "map_stats_roi": {
            "max": _num(float(out.roi_max[0])),
            "mean": _num(float(out.roi_mean[0])),
        },
    }
    if out.image_severity is not None:
        worst = int(out.image_severity[0])
        result["severity"] = names[worst] if worst >= 0 else None
    return result
