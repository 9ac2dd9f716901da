"""Every record a run writes, built here and only here, beside its JSON Schema.

Kinds (``record_schema.json``, docs/schema.md): a **result** (one input's defects), an
**error record** (why an input has no result; ``transient`` errors are retried by
``--resume``), a **region line** of ``regions.jsonl``, and the **mask block** inside a
result. Floats measured on float32 maps are written as the shortest text that reads back
to the same float32 (``0.9``, not ``0.8999999761581421``).

Example:
    >>> error_record(3, "a.npy", "unreadable", "a.npy: not a map")["error"]["transient"]
    False
    >>> f32(0.8999999761581421)
    0.9
"""

import json
from importlib import resources
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from torchdefects.files import json_safe, mask_encoding

__all__ = [
    "ERROR_TYPES",
    "TRANSIENT_ERROR_TYPES",
    "dumps",
    "error_record",
    "f32",
    "image_score_label",
    "mask_block",
    "record_schema",
    "region_line",
    "result_record",
    "units_columns",
]

#: Error types of the input itself (recorded, not retried) and of the moment (retried).
ERROR_TYPES: Tuple[str, ...] = (
    "file_not_found",
    "unreadable",
    "bad_shape",
    "empty_map",
    "nan_map",
    "too_large",
    "not_regular_file",
    "detector_error",
    "head_error",
    "write_error",
    "out_of_memory",
)
TRANSIENT_ERROR_TYPES: Tuple[str, ...] = ("out_of_memory",)


def _mask_dtype(encoding: str) -> str:
    """The dtype a mask file of this encoding decodes to (``files.mask_encoding`` owns it)."""
    fmt, _, rest = encoding.partition("_")
    return mask_encoding(fmt, "bool" if rest == "bool" else "uint8").dtype


def f32(x: Optional[float]) -> Optional[float]:
    """The shortest float that reads back to the same float32 as ``x`` (None stays)."""
    if x is None:
        return None
    v = np.float32(x)
    if not np.isfinite(v):
        return None
    return float(np.format_float_positional(v, unique=True, trim="0"))


def image_score_label(
    score: Optional[float], label: Optional[int], image_threshold: Optional[float]
) -> Tuple[Optional[float], Optional[int]]:
    """(score, label) of one image as recorded.

    The head decides the label (``Defects.image_label``: the score reaches
    ``image_threshold`` when one is set, else any region is reported). Without defects
    (``--no-defects``) there is a label only with an ``image_threshold``, by the same rule.
    """
    score = f32(score)
    if label is None and image_threshold is not None:
        label = int(score is not None and score >= np.float32(image_threshold))
    return score, label


def mask_block(
    path: str, shape: Sequence[int], encoding: str, space: str, mask_space: str = "roi"
) -> Dict[str, Any]:
    """Where an input's mask file is, how to read it, and which mask it is (``mask_space``:
    the config's, ``roi`` or ``full``)."""
    return {
        "path": path,
        "shape": [int(shape[0]), int(shape[1])],
        "dtype": _mask_dtype(encoding),
        "encoding": encoding,
        "space": space,
        "mask_space": mask_space,
    }


def _shape(bbox: List[int], area: int) -> Dict[str, Any]:
    """pyimgano's shape statistics of a region (``torchdefects.shape_stats``), exact."""
    w, h = bbox[2] - bbox[0] + 1, bbox[3] - bbox[1] + 1
    return {"bbox_area": w * h, "fill_ratio": area / (w * h), "aspect_ratio": max(w / h, h / w)}


def _regions(
    cols: Dict[str, List[Any]],
    start: int,
    n: int,
    space: Any,
    severity_names: Optional[Sequence[str]] = None,
) -> List[Dict[str, Any]]:
    out = []
    for j in range(start, start + n):
        reg: Dict[str, Any] = {
            "id": int(cols["label"][j]),
            "bbox_xyxy": [int(v) for v in cols["bbox_xyxy"][j]],
            "area": int(cols["area"][j]),
            "centroid_xy": [f32(v) for v in cols["centroid_xy"][j]],
            "score_max": f32(cols["score_max"][j]),
            "score_mean": f32(cols["score_mean"][j]),
        }
        reg.update(_shape(reg["bbox_xyxy"], reg["area"]))
        sol = cols["solidity"][j] if "solidity" in cols else None
        reg["solidity"] = None if sol is None or sol != sol else float(sol)
        if "merged_from_ids" in cols:
            reg["merged_from_ids"] = [int(v) for v in cols["merged_from_ids"][j]]
        if space is not None:
            reg["bbox_xyxy_image"] = space.bbox_to_image(reg["bbox_xyxy"])
        if "area_mm2" in cols:
            reg["area_mm2"] = float(cols["area_mm2"][j])
            reg["bbox_xyxy_mm"] = [float(v) for v in cols["bbox_xyxy_mm"][j]]
            reg["centroid_xy_mm"] = [float(v) for v in cols["centroid_xy_mm"][j]]
        if severity_names is not None:
            reg["severity"] = _severity_name(cols["severity"][j], severity_names)
        out.append(reg)
    return out


def _severity_name(index: int, names: Sequence[str]) -> Optional[str]:
    """A head severity class (rule index, -1 for none) as its rule's name (None)."""
    return names[int(index)] if int(index) >= 0 else None


def units_columns(
    regions: Any, counts: Sequence[int], spaces: Sequence[Any], pixel_size_mm: float
) -> Tuple[Dict[str, List[Any]], List[Dict[str, Any]]]:
    """Millimetre columns of a batch's regions and each input's ``units`` block.

    Each input's map pixel spans ``(sx, sy)`` original-image pixels and its corner lies at
    ``(ox, oy)`` (:meth:`~torchdefects.geometry.ImageSpace.affine_xy`; ``(1, 1)`` and
    ``(0, 0)`` without an image space), so :func:`~torchdefects.region_units` with
    ``pixel_size_mm`` gives ``area_mm2``, ``bbox_xyxy_mm`` and ``centroid_xy_mm`` (float64,
    written in full: a rule's ``min_area_mm2`` compares with exactly this number).

    Args:
        regions: the head's :class:`~torchdefects.Regions` (any device).
        counts: regions per input, in batch order.
        spaces: each input's :class:`~torchdefects.geometry.ImageSpace` or None.
        pixel_size_mm: size of an original-image pixel.
    """
    from torchdefects.regions import Regions
    from torchdefects.severity import region_units

    cpu = Regions(*(t.cpu() for t in regions))
    cols: Dict[str, List[Any]] = {"area_mm2": [], "bbox_xyxy_mm": [], "centroid_xy_mm": []}
    blocks = []
    start = 0
    for n, space in zip(counts, spaces):
        scale, origin = (1.0, 1.0), (0.0, 0.0)
        if space is not None:
            scale, origin = space.affine_xy()
        part = Regions(*(t[start : start + int(n)] for t in cpu))
        u = region_units(part, pixel_size_mm, scale, origin)
        cols["area_mm2"] += u.area_mm2.tolist()
        cols["bbox_xyxy_mm"] += u.bbox_xyxy_mm.tolist()
        cols["centroid_xy_mm"] += u.centroid_xy_mm.tolist()
        mm = [pixel_size_mm * scale[0], pixel_size_mm * scale[1]]
        blocks.append({"pixel_size_mm": float(pixel_size_mm), "map_pixel_mm_xy": mm})
        start += int(n)
    return cols, blocks


def result_record(
    *,
    index: int,
    path: str,
    map_shape: Tuple[int, int],
    image_size: Optional[Tuple[int, int]],
    space: Any,
    threshold: float,
    provenance: Dict[str, Any],
    roi_max: Optional[float],
    roi_mean: Optional[float],
    cols: Optional[Dict[str, List[Any]]],
    start: int,
    count: int,
    image_threshold: Optional[float],
    score: Optional[float] = None,
    score_source: str = "roi_max",
    label: Optional[int] = None,
    severity_names: Optional[Sequence[str]] = None,
    image_severity: Optional[int] = None,
    units: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """One input's result; ``cols`` (flat region columns of the batch, from the head) is
    ``None`` when defects are off, and then the record has no ``defects`` block. ``score``
    is the image score (the detector's, ``score_source="detector"``, else the ROI max).

    With ``severity_names`` (the config's rule names, in order) ``cols["severity"]`` holds
    the head's classes and ``image_severity`` the input's: both are written by name (null
    for none). With ``units`` (:func:`units_columns`) the regions carry their millimetre
    columns from ``cols``."""
    score, label = image_score_label(roi_max if score is None else score, label, image_threshold)
    source = score_source
    rec: Dict[str, Any] = {
        "index": int(index),
        "input": path,
        "anomaly_map": {"shape": [int(map_shape[0]), int(map_shape[1])]},
        "image_size": list(image_size) if image_size is not None else None,
        "score": score,
        "score_source": source,
        "label": label,
    }
    if cols is None:
        return rec
    space_json: Dict[str, Any] = {"type": "anomaly_map", "shape": list(rec["anomaly_map"]["shape"])}
    if space is not None:
        space_json["to_image"] = space.to_json()
    rec["defects"] = {
        "space": space_json,
        "pixel_threshold": threshold,
        "pixel_threshold_provenance": provenance,
        "map_stats_roi": {"max": f32(roi_max), "mean": f32(roi_mean)},
        "mask": None,
        "regions": _regions(cols, start, count, space, severity_names),
    }
    if units is not None:
        rec["defects"]["units"] = units
    if severity_names is not None:
        rec["defects"]["severity"] = _severity_name(
            -1 if image_severity is None else image_severity, severity_names
        )
    return rec


def error_record(index: int, path: str, etype: str, message: str) -> Dict[str, Any]:
    """Why input ``index`` has no result; ``transient`` says ``--resume`` retries it."""
    return {
        "index": int(index),
        "input": path,
        "error": {"type": etype, "message": message, "transient": etype in TRANSIENT_ERROR_TYPES},
    }


def region_line(record: Dict[str, Any], region: Dict[str, Any]) -> Dict[str, Any]:
    """One line of ``regions.jsonl``: the region with its input's index and path."""
    return {"index": record["index"], "input": record["input"], **region}


def dumps(obj: Dict[str, Any]) -> str:
    """One compact JSON line (no NaN: it is written as null)."""
    return json.dumps(json_safe(obj), allow_nan=False, separators=(",", ":"))


def record_schema() -> Dict[str, Any]:
    """The JSON Schema of ``results.jsonl`` lines (``$defs/region_line`` for regions)."""
    text = resources.files("torchdefects").joinpath("record_schema.json").read_text()
    return json.loads(text)
