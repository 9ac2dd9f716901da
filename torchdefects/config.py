"""``DefectsConfig`` and the JSON config file: settings of the defect pipeline, validated once.

The file (``schema_version`` 2; files with 1, pyimgano's ``infer_config.json`` included, are
read too)::

    {"schema_version": 2,
     "defects": {"pixel_threshold": 0.53, "pixel_threshold_provenance": {...},
                 "roi_xyxy_norm": [0.1, 0.1, 0.9, 0.9], "open_ksize": 3, "close_ksize": 3,
                 "fill_holes": true, "min_area": 16, "max_regions": 20, "connectivity": 8,
                 "mask_format": "png"},
     "per_category": {"bottle": {"defects": {"pixel_threshold": 0.61}}}}

Every key is optional. A ``defects`` block accepts exactly the fields of
:class:`DefectsConfig` (pyimgano's key names) and pyimgano's nested forms
(``map_smoothing``, ``hysteresis``, ``shape_filters``, ``merge_nearby``); any other key
inside one is an error with a did-you-mean. Keys outside the ``defects`` blocks (other
top-level keys, other keys of a category entry) belong to other tools, such as the rest of a
pyimgano ``infer_config.json``, and are kept but not read, except a near-miss of ``defects``
or ``per_category`` (a typo), which is an error. A top-level ``category`` (pyimgano's
workbench export) selects the category when none is given. See ``docs/config.md`` (every
field) and ``docs/pyimgano.md``.

Fields whose processing stage torchdefects does not have yet are listed in
:data:`UNSUPPORTED_UNTIL_IMPLEMENTED`: they are accepted at their neutral value only.
"""

import dataclasses
import difflib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional, Tuple, Union

from torchdefects._check import (
    check_bool,
    check_choice,
    check_finite,
    check_int,
    check_ksize,
    check_roi,
)

__all__ = [
    "KSIZE_MAX",
    "PROVENANCE_METHODS",
    "PROVENANCE_SCHEMA",
    "PROVENANCE_SOURCES",
    "SCHEMA_VERSION",
    "UNSUPPORTED_UNTIL_IMPLEMENTED",
    "ConfigError",
    "DefectsConfig",
    "config_docs_markdown",
    "field_flag",
    "load_config",
    "read_config_dict",
    "save_config",
    "set_pixel_threshold",
    "severity_rules_arg",
    "upgrade_provenance",
    "validate_config_dict",
]

#: The version written. 1 (pyimgano's ``infer_config.json`` and torchdefects before the
#: pyimgano provenance vocabulary) is still read; provenance is recognised by its values.
SCHEMA_VERSION = 2
READ_SCHEMA_VERSIONS = (1, 2)
MASK_FORMATS = ("png", "npy", "npz")

#: Largest kernel side a config accepts. A k x k window wider than 2 max(H, W) + 1 covers the
#: whole map from every pixel, so it equals that size; 1001 covers maps up to 500 px of margin
#: (see docs/config.md) and keeps a typo such as 100000001 from allocating gigabytes.
KSIZE_MAX = 1001

#: pyimgano's provenance vocabulary: where the threshold came from, how it was made.
PROVENANCE_SOURCES = ("explicit", "infer_config", "train_dir")
#: ``supervised_segf1`` and ``image_f1`` are reserved for thresholds chosen from labelled data.
PROVENANCE_METHODS = (
    "fixed",
    "normal_pixel_quantile",
    "supervised_segf1",
    "image_f1",
    "normal_quantile",
)
#: The sources written by torchdefects before schema version 2; read and converted.
LEGACY_PROVENANCE_SOURCES = ("config", "calibration")

#: Fields whose stage torchdefects lacks for now, with the neutral value they are accepted at.
#: A field's sub-settings (``hysteresis_low``, ``map_smoothing_ksize`` ...) are inert while
#: its switch here is neutral, so they are validated but accepted. The toolbox empties this.
UNSUPPORTED_UNTIL_IMPLEMENTED: Dict[str, Any] = {}

#: pyimgano's nested forms inside ``defects``: ``{block: {key: field}}``.
PYIMGANO_NESTED: Dict[str, Dict[str, str]] = {
    "map_smoothing": {
        "method": "map_smoothing_method",
        "ksize": "map_smoothing_ksize",
        "sigma": "map_smoothing_sigma",
    },
    "hysteresis": {
        "enabled": "hysteresis_enabled",
        "low": "hysteresis_low",
        "high": "hysteresis_high",
    },
    "shape_filters": {
        "min_fill_ratio": "min_fill_ratio",
        "max_aspect_ratio": "max_aspect_ratio",
        "min_solidity": "min_solidity",
    },
    "merge_nearby": {"enabled": "merge_nearby_enabled", "max_gap_px": "merge_nearby_max_gap_px"},
}

#: Top-level keys pyimgano's ``infer_config.json`` writes; never taken for typos.
PYIMGANO_TOP_LEVEL_KEYS = (
    "adaptation",
    "artifact_quality",
    "category",
    "checkpoint",
    "from_run",
    "model",
    "operator_contract",
    "postprocess",
    "prediction",
    "preprocessing",
    "split_fingerprint",
    "threshold",
    "threshold_provenance",
)

# Bounds on what a config file may hold: its size, and how deep its nesting goes.
MAX_CONFIG_BYTES = 64 << 20
MAX_CONFIG_DEPTH = 64
_INT64_MAX = (1 << 63) - 1


class ConfigError(ValueError):
    """A config file or dict is invalid; the message names the file and the field path."""


def severity_rules_arg(text: str) -> List[Dict[str, Any]]:
    """``--defect-severity-rules``: a JSON list of rules, or ``@path`` to a JSON file with one.

    Example:
        >>> severity_rules_arg('[{"name": "critical", "min_area": 50}]')
        [{'name': 'critical', 'min_area': 50}]
    """
    import argparse

    source = "--defect-severity-rules"
    if text.startswith("@"):
        source = text[1:]
        try:
            with open(source, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise argparse.ArgumentTypeError(f"cannot read {source}: {e.strerror}") from None
    try:
        rules = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"{source} must be a JSON list of rules such as "
            f'\'[{{"name": "critical", "min_area_mm2": 0.5}}]\', got {text[:60]!r} ({e})'
        ) from None
    if not isinstance(rules, list):
        raise argparse.ArgumentTypeError(
            f"{source} must be a JSON list of rules, got {type(rules).__name__}"
        )
    return rules


def _f(default: Any, help: str, **meta: Any) -> Any:
    """``field(default=default, metadata={"help": help, **meta})`` for immutable defaults."""
    meta["help"] = help
    return field(default=default, metadata=meta)


@dataclass
class DefectsConfig:
    """Settings of :class:`~torchdefects.DefectHead`; names follow pyimgano's ``defects`` block.

    Each field carries its documentation in ``dataclasses.field(metadata=...)``: ``help``
    (one line), ``flag`` (the CLI flag; default ``--`` + name with ``_`` as ``-``, see
    :func:`field_flag`), ``aliases`` (more flags), ``choices``, ``group`` (the ``--help``
    section), ``oracle`` (what the stage is tested against) and ``cli`` (``False``: not a
    flag). ``docs/config.md`` is generated from it (:func:`config_docs_markdown`).

    Fields in :data:`UNSUPPORTED_UNTIL_IMPLEMENTED` accept only their neutral value for now.

    Raises:
        ValueError, TypeError: a field is out of range; the message names the field.

    Example:
        >>> DefectsConfig(pixel_threshold=0.5, min_area=4).min_area
        4
    """

    enabled: bool = _f(
        True,
        "produce defects (masks and regions); false turns the defects block off, as in pyimgano",
        flag="--defects",
        cli=False,  # run's own --defects/--no-defects (RunOptions.defects) sets it
        group="defects",
        oracle="-",
    )
    pixel_threshold: Optional[float] = _f(
        None,
        "a map pixel >= this is foreground; null: given per call, or resolved by the strategy",
        group="threshold",
        oracle="numpy >=",
    )
    pixel_threshold_strategy: str = _f(
        "normal_pixel_quantile",
        "where the threshold comes from when none is given: fixed (error without one), "
        "infer_config (the config's), normal_pixel_quantile (calibrate on normal maps)",
        choices=("fixed", "infer_config", "normal_pixel_quantile"),
        group="threshold",
        oracle="-",
    )
    pixel_normal_quantile: float = _f(
        0.999,
        "quantile of normal ROI pixels for normal_pixel_quantile, in (0, 1]",
        group="threshold",
        oracle="numpy.quantile (linear)",
    )
    pixel_threshold_provenance: Optional[Dict[str, Any]] = field(
        default=None,
        metadata={
            "help": "where pixel_threshold came from (docs/calibration.md), or null",
            "cli": False,
            "group": "threshold",
            "oracle": "-",
        },
    )
    roi_xyxy_norm: Optional[List[float]] = field(
        default=None,
        metadata={
            "help": "region of interest [x1, y1, x2, y2] in [0, 1] (clamped, reordered); "
            "null: whole map",
            "group": "roi",
            "metavar": ("X1", "Y1", "X2", "Y2"),
            "oracle": "numpy slicing floor(x1 W)..ceil(x2 W)-1",
        },
    )
    mask_space: str = _f(
        "roi",
        "pyimgano's exported mask: roi (the reported regions) or full (the whole map's mask, "
        "no ROI gate, no max_regions; regions stay ROI-gated)",
        flag="--defects-mask-space",
        choices=("roi", "full"),
        group="roi",
        oracle="NumPy/OpenCV/SciPy pipeline without the ROI",
    )
    border_ignore_px: int = _f(
        0,
        "ignore this many pixels at the map border",
        flag="--defect-border-ignore-px",
        group="map",
        oracle="numpy slicing",
    )
    map_smoothing_method: str = _f(
        "none",
        "smooth the map before thresholding",
        flag="--defect-map-smoothing",
        choices=("none", "gaussian", "median", "box"),
        group="map",
        oracle="cv2.GaussianBlur / medianBlur / blur",
    )
    map_smoothing_ksize: int = _f(
        0,
        f"smoothing kernel side (0: from sigma; median/box: 0, 1 or >= 3), at most {KSIZE_MAX}",
        flag="--defect-map-smoothing-ksize",
        group="map",
        oracle="cv2",
    )
    map_smoothing_sigma: float = _f(
        0.0,
        "gaussian sigma, >= 0 (0: OpenCV's sigma from ksize)",
        flag="--defect-map-smoothing-sigma",
        group="map",
        oracle="cv2.GaussianBlur",
    )
    hysteresis_enabled: bool = _f(
        False,
        "hysteresis thresholding",
        flag="--defect-hysteresis",
        group="threshold",
        oracle="scipy.ndimage.label + per-component check",
    )
    hysteresis_low: Optional[float] = _f(
        None,
        "hysteresis low threshold, >= 0 (null: high / 2)",
        flag="--defect-hysteresis-low",
        group="threshold",
        oracle="skimage.filters.apply_hysteresis_threshold",
    )
    hysteresis_high: Optional[float] = _f(
        None,
        "hysteresis high threshold, >= 0 (null: pixel_threshold)",
        flag="--defect-hysteresis-high",
        group="threshold",
        oracle="skimage.filters.apply_hysteresis_threshold",
    )
    open_ksize: int = _f(
        0,
        f"side of the square opening (0 = off, else odd >= 3, at most {KSIZE_MAX})",
        flag="--defect-open-ksize",
        group="mask",
        oracle="cv2.morphologyEx(MORPH_OPEN)",
    )
    close_ksize: int = _f(
        0,
        f"side of the square closing (0 = off, else odd >= 3, at most {KSIZE_MAX})",
        flag="--defect-close-ksize",
        group="mask",
        oracle="cv2.morphologyEx(MORPH_CLOSE)",
    )
    fill_holes: bool = _f(
        False,
        "fill background not 4-connected to the border",
        flag="--defect-fill-holes",
        group="mask",
        oracle="scipy.ndimage.binary_fill_holes",
    )
    mask_dilate_ksize: int = _f(
        0,
        "dilate the mask with an elliptic kernel of this side",
        flag="--defects-mask-dilate",
        group="mask",
        oracle="cv2.dilate(getStructuringElement(MORPH_ELLIPSE))",
    )
    connectivity: int = _f(
        8,
        "pixel connectivity of regions: 4 or 8",
        choices=(4, 8),
        group="regions",
        oracle="scipy.ndimage.label",
    )
    min_area: int = _f(
        0,
        "drop regions with fewer pixels",
        flag="--defect-min-area",
        group="regions",
        oracle="numpy",
    )
    min_score_max: Optional[float] = _f(
        None,
        "drop regions whose max score is below this, >= 0",
        flag="--defect-min-score-max",
        group="regions",
        oracle="scipy.ndimage.maximum",
    )
    min_score_mean: Optional[float] = _f(
        None,
        "drop regions whose mean score is below this, >= 0",
        flag="--defect-min-score-mean",
        group="regions",
        oracle="scipy.ndimage.mean",
    )
    min_fill_ratio: Optional[float] = _f(
        None,
        "drop regions with area / bbox area below this, in [0, 1]",
        flag="--defect-min-fill-ratio",
        group="regions",
        oracle="numpy",
    )
    max_aspect_ratio: Optional[float] = _f(
        None,
        "drop regions with a bbox aspect ratio above this, >= 1",
        flag="--defect-max-aspect-ratio",
        group="regions",
        oracle="numpy",
    )
    min_solidity: Optional[float] = _f(
        None,
        "drop regions with contour area / hull area below this, in [0, 1]",
        flag="--defect-min-solidity",
        group="regions",
        oracle="cv2.findContours + convexHull + contourArea",
    )
    merge_nearby_enabled: bool = _f(
        False,
        "merge regions whose bboxes lie within merge_nearby_max_gap_px",
        flag="--defect-merge-nearby",
        group="regions",
        oracle="pyimgano's merge rule in NumPy",
    )
    merge_nearby_max_gap_px: int = _f(
        0,
        "largest bbox gap in pixels that merges two regions, >= 0",
        flag="--defect-merge-nearby-max-gap-px",
        group="regions",
        oracle="pyimgano's merge rule in NumPy",
    )
    min_score_max_quantile: Optional[float] = _f(
        None,
        "keep regions whose max score is >= this quantile of the image's region max scores, "
        "in [0, 1]",
        flag="--defect-min-score-max-quantile",
        group="regions",
        oracle="numpy.quantile",
    )
    max_regions_sort_by: str = _f(
        "score_max",
        "sort key of regions before max_regions (descending)",
        flag="--defect-max-regions-sort-by",
        choices=("score_max", "score_mean", "area"),
        group="regions",
        oracle="sorted()",
    )
    max_regions: Optional[int] = _f(
        None,
        "keep at most this many regions per image (null: all); the mask keeps only those",
        flag="--defect-max-regions",
        group="regions",
        oracle="sorted()",
    )
    pixel_size_mm: Optional[float] = _f(
        None,
        "size of an original-image pixel in mm, > 0 (gives area_mm2 and mm boxes; a map pixel "
        "is this times the map-to-image scale); null: none",
        flag="--defect-pixel-size-mm",
        group="regions",
        oracle="by hand",
    )
    severity_rules: Optional[List[Dict[str, Any]]] = field(
        default=None,
        metadata={
            "help": "ordered severity rules [{name, min_area, min_score_max, min_score_mean, "
            "min_area_mm2, min_length_mm, min_aspect_ratio}]; a region takes the first whose "
            "conditions (feature >= value) all hold, the image its most severe region's; "
            "null: none. CLI: JSON text or @FILE.json",
            "flag": "--defect-severity-rules",
            "type": severity_rules_arg,
            "nargs": None,
            "metavar": "JSON",
            "group": "regions",
            "oracle": "Python first-match loop",
        },
    )
    image_threshold: Optional[float] = _f(
        None,
        "an image is defective when its image score is >= this; null: when it has a region",
        group="image",
        oracle="numpy >=",
    )
    image_threshold_provenance: Optional[Dict[str, Any]] = field(
        default=None,
        metadata={
            "help": "where image_threshold came from (calibrate --image-strategy), or null",
            "cli": False,
            "group": "image",
            "oracle": "-",
        },
    )
    mask_format: str = _f(
        "png",
        "how torchdefects run writes masks: png, npy or npz",
        choices=MASK_FORMATS,
        group="output",
        oracle="-",
    )
    _prefix: str = field(default="", repr=False, compare=False, metadata={"cli": False})

    def __post_init__(self) -> None:
        self.validate(self._prefix)

    def validate(self, prefix: str = "") -> None:
        """Check every field; ``prefix`` is put before field names in messages."""
        p = prefix
        check_bool(p + "enabled", self.enabled)
        check_finite(p + "pixel_threshold", self.pixel_threshold, allow_none=True)
        _check_choices(self, p, "pixel_threshold_strategy")
        _check_range(p + "pixel_normal_quantile", self.pixel_normal_quantile, 0.0, 1.0, False)
        _check_provenance(p + "pixel_threshold_provenance", self.pixel_threshold_provenance)
        check_roi(p + "roi_xyxy_norm", self.roi_xyxy_norm)
        _check_choices(self, p, "mask_space")
        check_int(p + "border_ignore_px", self.border_ignore_px, minimum=0)
        _check_choices(self, p, "map_smoothing_method")
        check_int(p + "map_smoothing_ksize", self.map_smoothing_ksize, minimum=0)
        _check_cap(p + "map_smoothing_ksize", self.map_smoothing_ksize)
        if self.map_smoothing_method in ("median", "box") and self.map_smoothing_ksize == 2:
            raise ValueError(
                f"{p}map_smoothing_ksize must be 0, 1 or >= 3 for {self.map_smoothing_method} "
                "smoothing, got 2"
            )
        _check_min(p + "map_smoothing_sigma", self.map_smoothing_sigma, 0.0)
        check_bool(p + "hysteresis_enabled", self.hysteresis_enabled)
        _check_min(p + "hysteresis_low", self.hysteresis_low, 0.0, allow_none=True)
        _check_min(p + "hysteresis_high", self.hysteresis_high, 0.0, allow_none=True)
        for name in ("open_ksize", "close_ksize"):
            check_ksize(p + name, getattr(self, name))
            _check_cap(p + name, getattr(self, name))
        check_bool(p + "fill_holes", self.fill_holes)
        check_int(p + "mask_dilate_ksize", self.mask_dilate_ksize, minimum=0)
        _check_cap(p + "mask_dilate_ksize", self.mask_dilate_ksize)
        _check_choices(self, p, "connectivity")
        check_int(p + "min_area", self.min_area, minimum=0)
        _check_min(p + "min_score_max", self.min_score_max, 0.0, allow_none=True)
        _check_min(p + "min_score_mean", self.min_score_mean, 0.0, allow_none=True)
        _check_range(p + "min_fill_ratio", self.min_fill_ratio, 0.0, 1.0, True, allow_none=True)
        _check_min(p + "max_aspect_ratio", self.max_aspect_ratio, 1.0, allow_none=True)
        _check_range(p + "min_solidity", self.min_solidity, 0.0, 1.0, True, allow_none=True)
        check_bool(p + "merge_nearby_enabled", self.merge_nearby_enabled)
        check_int(p + "merge_nearby_max_gap_px", self.merge_nearby_max_gap_px, minimum=0)
        _check_range(
            p + "min_score_max_quantile", self.min_score_max_quantile, 0.0, 1.0, True, True
        )
        _check_choices(self, p, "max_regions_sort_by")
        check_int(p + "max_regions", self.max_regions, minimum=1, allow_none=True)
        if self.pixel_size_mm is not None:
            check_finite(p + "pixel_size_mm", self.pixel_size_mm)
            if self.pixel_size_mm <= 0:
                raise ValueError(f"{p}pixel_size_mm must be > 0 or null, got {self.pixel_size_mm}")
        if self.severity_rules is not None:
            from torchdefects.severity import parse_severity_rules

            try:
                parse_severity_rules(self.severity_rules, self.pixel_size_mm is not None)
            except (TypeError, ValueError) as e:
                raise type(e)(p + str(e)) from None
        check_finite(p + "image_threshold", self.image_threshold, allow_none=True)
        _check_provenance(p + "image_threshold_provenance", self.image_threshold_provenance)
        _check_choices(self, p, "mask_format")
        for name, neutral in UNSUPPORTED_UNTIL_IMPLEMENTED.items():
            value = getattr(self, name)
            if value != neutral or type(value) is not type(neutral):
                raise ValueError(
                    f"{p}{name}={_json(value)} is not supported yet by torchdefects (only "
                    f"{_json(neutral)} is accepted until its stage lands); remove the key or "
                    f"set it to {_json(neutral)}"
                )
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, float(value))
        if self.roi_xyxy_norm is not None:
            self.roi_xyxy_norm = [float(v) for v in self.roi_xyxy_norm]

    def to_dict(self) -> Dict[str, Any]:
        """The fields as a JSON-ready dict (the ``defects`` block of a config file)."""
        d = asdict(self)
        d.pop("_prefix")
        return d


_FLOAT_FIELDS = (
    "pixel_threshold",
    "pixel_size_mm",
    "pixel_normal_quantile",
    "map_smoothing_sigma",
    "hysteresis_low",
    "hysteresis_high",
    "min_score_max",
    "min_score_mean",
    "min_fill_ratio",
    "max_aspect_ratio",
    "min_solidity",
    "min_score_max_quantile",
    "image_threshold",
)


def _json(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _check_choices(cfg: DefectsConfig, prefix: str, name: str) -> None:
    check_choice(prefix + name, getattr(cfg, name), _FIELDS[name].metadata["choices"])


def _check_cap(name: str, value: int) -> None:
    if value > KSIZE_MAX:
        raise ValueError(
            f"{name} must be at most {KSIZE_MAX} (a window wider than 2 max(H, W) + 1 changes "
            f"nothing; see docs/config.md), got {value}"
        )


def _check_min(name: str, value: Any, minimum: float, allow_none: bool = False) -> None:
    check_finite(name, value, allow_none=allow_none)
    if value is not None and value < minimum:
        tail = " or null" if allow_none else ""
        raise ValueError(f"{name} must be >= {minimum}{tail}, got {value}")


def _check_range(
    name: str, value: Any, lo: float, hi: float, lo_closed: bool, allow_none: bool = False
) -> None:
    check_finite(name, value, allow_none=allow_none)
    if value is None:
        return
    if not ((lo <= value if lo_closed else lo < value) and value <= hi):
        left = "[" if lo_closed else "("
        tail = " or null" if allow_none else ""
        raise ValueError(f"{name} must be in {left}{lo}, {hi}]{tail}, got {value}")


_FIELDS = {f.name: f for f in fields(DefectsConfig)}

#: Keys a ``defects`` block may hold (besides pyimgano's nested forms).
DEFECTS_KEYS = tuple(f.name for f in fields(DefectsConfig) if not f.name.startswith("_"))


def field_flag(f: "dataclasses.Field[Any]") -> str:
    """The CLI flag of a :class:`DefectsConfig` field: ``metadata["flag"]`` or ``--name``."""
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


# ----------------------------------------------------------------------------
# Provenance
# ----------------------------------------------------------------------------

_NUMBER = {"type": "number"}
_COUNT = {"type": "integer", "minimum": 0}

#: JSON Schema of a threshold provenance record (pyimgano's vocabulary plus ours). Records
#: of the legacy vocabulary (``source`` ``config`` / ``calibration``) are accepted too.
PROVENANCE_SCHEMA: Dict[str, Any] = {
    "type": "object",
    "required": ["source"],
    "properties": {
        "source": {"enum": list(PROVENANCE_SOURCES) + list(LEGACY_PROVENANCE_SOURCES)},
        "method": {"type": "string"},
        "value": _NUMBER,
        "path": {"type": ["string", "null"]},
        "q": _NUMBER,
        "calibration_map_count": _COUNT,
        "calibration_pixel_count": _COUNT,
        "map_pixel_count": _COUNT,
        "roi_used": {"type": "boolean"},
        "roi_reason": {"type": ["string", "null"]},
        "roi_xyxy_norm": {
            "oneOf": [
                {"type": "array", "items": _NUMBER, "minItems": 4, "maxItems": 4},
                {"type": "null"},
            ]
        },
        "roi_pixel_count": {"oneOf": [_COUNT, {"type": "null"}]},
        "fingerprint": {"type": "string"},
        "torchdefects_version": {"type": "string"},
        "created_at": {"type": "string"},
        "exactness": {"enum": ["exact"]},
        "passes": {"enum": [1, 2]},
        "nan_policy": {"enum": ["raise", "omit"]},
        "nan_pixel_count": _COUNT,
        "normal_min": {"type": ["number", "null"]},
        "normal_max": {"type": ["number", "null"]},
        "normal_quantiles": {
            "type": "object",
            "additionalProperties": {"type": ["number", "null"]},
        },
        "stored_provenance": {"type": ["object", "null"]},
        "upgraded_from": {"type": "string"},
    },
    "allOf": [
        {
            "if": {"properties": {"source": {"enum": list(PROVENANCE_SOURCES)}}},
            "then": {
                "required": ["method"],
                "properties": {"method": {"enum": list(PROVENANCE_METHODS)}},
            },
        }
    ],
}


def _check_provenance(name: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a JSON object or null, got {value!r}")
    source = value.get("source")
    allowed_sources = PROVENANCE_SOURCES + LEGACY_PROVENANCE_SOURCES
    if source not in allowed_sources:
        allowed = ", ".join(repr(s) for s in PROVENANCE_SOURCES)
        raise ValueError(f"{name}.source must be one of {allowed}, got {source!r}")
    method = value.get("method")
    if source in PROVENANCE_SOURCES and method is not None and method not in PROVENANCE_METHODS:
        allowed = ", ".join(repr(s) for s in PROVENANCE_METHODS)
        raise ValueError(f"{name}.method must be one of {allowed}, got {method!r}")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be plain JSON (no NaN or infinity): {e}") from e


def upgrade_provenance(prov: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """A provenance record in pyimgano's vocabulary (a copy); records already in it unchanged.

    The records torchdefects wrote before config schema version 2 are recognised by their
    ``source`` and converted (``docs/calibration.md``, "Older files"):

    - ``"calibration"`` -> ``"train_dir"``; the old ``calibration_pixel_count`` (every pixel
      of the maps) becomes ``map_pixel_count``; the old ``roi_pixel_count`` (the pixels that
      entered the quantile, over all maps) becomes ``calibration_pixel_count`` (pyimgano's
      meaning); ``roi_pixel_count`` (pyimgano: per map) becomes ``null``, as the old record
      cannot tell it, unless there was no ROI; ``roi_used`` is whether a ROI was given.
    - ``"config"`` -> ``"infer_config"`` with ``method: "fixed"``; a nested
      ``stored_provenance`` is converted too.
    - ``"explicit"`` without ``method`` gains ``method: "fixed"``.

    A converted record carries ``upgraded_from`` (the old source).

    Example:
        >>> upgrade_provenance({"source": "config", "path": "c.json"})["source"]
        'infer_config'
    """
    if prov is None:
        return None
    out = dict(prov)
    source = out.get("source")
    if source == "calibration":
        roi = out.get("roi_xyxy_norm")
        old_total = out.pop("calibration_pixel_count", None)
        old_roi = out.pop("roi_pixel_count", None)
        out["source"] = "train_dir"
        out.setdefault("method", "normal_pixel_quantile")
        if old_total is not None:
            out["map_pixel_count"] = old_total
        if old_roi is not None:
            out["calibration_pixel_count"] = old_roi
        out["roi_used"] = roi is not None
        out.setdefault("roi_reason", None)
        out["roi_pixel_count"] = None
        out["upgraded_from"] = "calibration"
    elif source == "config":
        out["source"] = "infer_config"
        out.setdefault("method", "fixed")
        if isinstance(out.get("stored_provenance"), dict):
            out["stored_provenance"] = upgrade_provenance(out["stored_provenance"])
        out["upgraded_from"] = "config"
    elif source == "explicit":
        out.setdefault("method", "fixed")
    elif source == "infer_config" and isinstance(out.get("stored_provenance"), dict):
        out["stored_provenance"] = upgrade_provenance(out["stored_provenance"])
    return out


# ----------------------------------------------------------------------------
# Reading: bounded JSON
# ----------------------------------------------------------------------------


class _OutOfRange:
    """A number literal outside the int64 or float range, kept to name its path."""

    def __init__(self, text: str) -> None:
        self.text = text

    def describe(self) -> str:
        t = self.text
        shown = t if len(t) <= 24 else f"{t[:12]}...{t[-6:]} ({len(t)} characters)"
        return f"number {shown} is outside the int64/float64 range"


def _parse_int(text: str) -> Any:
    # Python refuses int() of more than 4300 digits; int64 needs at most 19.
    if len(text.lstrip("-")) > 19:
        return _OutOfRange(text)
    v = int(text)
    return v if -_INT64_MAX - 1 <= v <= _INT64_MAX else _OutOfRange(text)


def _parse_float(text: str) -> Any:
    v = float(text)
    return v if math.isfinite(v) else _OutOfRange(text)


_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\],:]')


def _depth_error_path(text: str, limit: int) -> Optional[str]:
    """The key path where nesting first passes ``limit`` levels, or ``None`` if it never does."""
    if text.count("{") + text.count("[") <= limit:
        return None  # cannot nest deeper than the number of openers
    stack: List[List[Any]] = []  # [kind, key or index, expecting_key]
    for m in _TOKENS.finditer(text):
        tok = m.group()
        if tok[0] == '"':
            if stack and stack[-1][0] == "{" and stack[-1][2]:
                try:
                    stack[-1][1] = json.loads(tok)
                except ValueError:
                    stack[-1][1] = tok[1:-1]
                stack[-1][2] = False
        elif tok in "{[":
            stack.append([tok, None if tok == "{" else 0, tok == "{"])
            if len(stack) > limit:
                return _path_of(stack[:-1])
        elif tok in "}]":
            if stack:
                stack.pop()
        elif tok == "," and stack:
            if stack[-1][0] == "[":
                stack[-1][1] += 1
            else:
                stack[-1][2] = True
    return None


def _path_of(stack: List[List[Any]]) -> str:
    parts = []
    for kind, key, _ in stack:
        parts.append(f"[{key}]" if kind == "[" else f".{key}")
    return "".join(parts).lstrip(".") or "$"


def _bad_number(v: Any) -> Optional[str]:
    if isinstance(v, _OutOfRange):
        return v.describe()
    if type(v) is int and not -_INT64_MAX - 1 <= v <= _INT64_MAX:
        # str() of a huge int is refused past 4300 digits; the bit length is enough.
        return f"integer of {v.bit_length()} bits is outside the int64 range"
    return None


def _has_problem(raw: Any, limit: int) -> bool:
    """Whether ``raw`` holds an out-of-range number or nests deeper than ``limit`` (fast)."""
    todo: List[Tuple[Any, int]] = [(raw, 0)]
    while todo:
        obj, depth = todo.pop()
        values = obj.values() if isinstance(obj, dict) else obj
        for v in values:
            if isinstance(v, (dict, list, tuple)):
                if depth + 1 >= limit:
                    return True
                todo.append((v, depth + 1))
            elif _bad_number(v) is not None:
                return True
    return _bad_number(raw) is not None


def _find_problem(raw: Any, limit: int = MAX_CONFIG_DEPTH) -> Optional[Tuple[str, str]]:
    """The first ``(path, message)``: an out-of-range number, or nesting past ``limit``.

    Iterative (no recursion, whatever the depth); paths are built only when there is a
    problem to name.
    """
    if not isinstance(raw, (dict, list, tuple)):
        bad = _bad_number(raw)
        return None if bad is None else ("$", bad)
    if not _has_problem(raw, limit):
        return None
    todo: List[Tuple[str, Any, int]] = [("", raw, 0)]
    while todo:
        path, v, depth = todo.pop()
        bad = _bad_number(v)
        if bad is not None:
            return path or "$", bad
        if isinstance(v, (dict, list, tuple)):
            if depth >= limit:
                return path or "$", f"nesting deeper than {limit} levels; a config is a few deep"
            if isinstance(v, dict):
                for k in reversed(list(v)):
                    todo.append((f"{path}.{k}" if path else str(k), v[k], depth + 1))
            else:
                for idx in range(len(v) - 1, -1, -1):
                    todo.append((f"{path}[{idx}]", v[idx], depth + 1))
    return None  # pragma: no cover - _has_problem said there is one


def _loads_bounded(text: str, where: str) -> Any:
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}config is {len(text)} bytes; at most {MAX_CONFIG_BYTES}")
    try:
        raw = json.loads(text, parse_int=_parse_int, parse_float=_parse_float)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{where}not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from e
    except RecursionError as e:
        deep = _depth_error_path(text, MAX_CONFIG_DEPTH)
        raise ConfigError(
            f"{where}{deep or '$'}: nesting deeper than {MAX_CONFIG_DEPTH} levels; a config is "
            "a few levels deep"
        ) from e
    except ValueError as e:
        raise ConfigError(f"{where}not a readable JSON config: {type(e).__name__}: {e}") from e
    bad = _find_problem(raw)
    if bad is not None:
        raise ConfigError(f"{where}{bad[0]}: {bad[1]}")
    return raw


def read_config_dict(path: str) -> Dict[str, Any]:
    """The JSON object in ``path``, not yet validated.

    Numbers outside the int64/float64 range, nesting deeper than ``MAX_CONFIG_DEPTH`` and
    files over ``MAX_CONFIG_BYTES`` are errors naming the path inside the file.

    Raises:
        ConfigError: the file is missing, unreadable, not JSON or not an object; the message
            starts with the path (and gives line and column for JSON syntax errors).
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_CONFIG_BYTES + 1)
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or e
        raise ConfigError(f"{path}: cannot read config: {reason}") from e
    raw = _loads_bounded(text, f"{path}: ")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: config must be a JSON object, got {type(raw).__name__}")
    return raw


# ----------------------------------------------------------------------------
# Validating
# ----------------------------------------------------------------------------


def _where(source: Optional[str]) -> str:
    return f"{source}: " if source else ""


def _did_you_mean(key: str, candidates: Any) -> str:
    close = difflib.get_close_matches(str(key), list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _flatten_block(block: Any, path: str, source: Optional[str]) -> Dict[str, Any]:
    """A ``defects`` block as ``{field: value}``, pyimgano's nested forms flattened."""
    if not isinstance(block, dict):
        raise ConfigError(f"{_where(source)}{path} must be a JSON object, got {block!r}")
    flat: Dict[str, Any] = {}
    origin: Dict[str, str] = {}
    allowed = DEFECTS_KEYS + tuple(PYIMGANO_NESTED)
    for key, value in block.items():
        if key in PYIMGANO_NESTED:
            if value is None:
                continue
            sub_path = f"{path}.{key}"
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{_where(source)}{sub_path} must be a JSON object or null, got {value!r}"
                )
            names = PYIMGANO_NESTED[key]
            for sub_key, sub_value in value.items():
                if sub_key not in names:
                    raise ConfigError(
                        f"{_where(source)}{sub_path}: unknown key {sub_key!r} (at "
                        f"{sub_path}.{sub_key}){_did_you_mean(sub_key, names)} allowed keys: "
                        + ", ".join(names)
                    )
                if sub_value is None and _FIELDS[names[sub_key]].default is not None:
                    continue  # pyimgano reads null as its default
                _put(flat, origin, names[sub_key], sub_value, f"{sub_path}.{sub_key}", source)
        elif key in DEFECTS_KEYS:
            _put(flat, origin, key, value, f"{path}.{key}", source)
        else:
            hint = _did_you_mean(key, allowed)
            raise ConfigError(
                f"{_where(source)}{path}: unknown key {key!r} (at {path}.{key}){hint} "
                "allowed keys: " + ", ".join(allowed)
            )
    return flat


def _put(
    flat: Dict[str, Any],
    origin: Dict[str, str],
    name: str,
    value: Any,
    where: str,
    source: Optional[str],
) -> None:
    if name in flat and flat[name] != value:
        raise ConfigError(
            f"{_where(source)}{where} and {origin[name]} both set {name}, to different values"
        )
    flat[name] = value
    origin[name] = where


def _make(values: Dict[str, Any], prefix: str, source: Optional[str]) -> DefectsConfig:
    values = dict(values)
    if values.get("pixel_threshold_provenance") is not None:
        prov = values["pixel_threshold_provenance"]
        try:
            _check_provenance(prefix + "pixel_threshold_provenance", prov)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{_where(source)}{e}") from e
        values["pixel_threshold_provenance"] = upgrade_provenance(prov)
    try:
        return DefectsConfig(**values, _prefix=prefix)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{_where(source)}{e}") from e


def _merge(base: Dict[str, Any], override: Dict[str, Any]) -> Dict[str, Any]:
    merged = dict(base)
    merged.update(override)
    # A category's own threshold must not inherit the global threshold's provenance.
    if "pixel_threshold" in override and "pixel_threshold_provenance" not in override:
        merged["pixel_threshold_provenance"] = None
    return merged


def _typo_check(keys: Any, targets: Tuple[str, ...], known: Tuple[str, ...], what: str) -> None:
    # 0.85: "defect" (0.92) and "per_categroy" are typos; pyimgano's "category" (0.8 of
    # "per_category") is listed in ``known`` anyway.
    for key in keys:
        if key in targets or key in known or not isinstance(key, str):
            continue
        close = difflib.get_close_matches(key, targets, n=1, cutoff=0.85)
        if close:
            raise ConfigError(f"{what} {key!r}; did you mean {close[0]!r}?")


def _check_schema_version(raw: Dict[str, Any], source: Optional[str]) -> None:
    if "schema_version" in raw:
        v = raw["schema_version"]
        if isinstance(v, bool) or v not in READ_SCHEMA_VERSIONS:
            versions = " or ".join(str(x) for x in READ_SCHEMA_VERSIONS)
            raise ConfigError(f"{_where(source)}schema_version must be {versions}, got {v!r}")


def validate_config_dict(raw: Any, source: Optional[str] = None) -> Dict[str, DefectsConfig]:
    """Validate a whole config; return the global config and every category's merged one.

    Returns:
        ``{"": global_config, "bottle": merged_config, ...}``.

    Raises:
        ConfigError: the message names ``source`` (a path) and the field path.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{_where(source)}config must be a JSON object, got {type(raw).__name__}")
    bad = _find_problem(raw)
    if bad is not None:
        raise ConfigError(f"{_where(source)}{bad[0]}: {bad[1]}")
    where = _where(source)
    _typo_check(
        raw,
        ("defects", "per_category"),
        ("schema_version",) + PYIMGANO_TOP_LEVEL_KEYS,
        f"{where}unknown top-level key",
    )
    _check_schema_version(raw, source)
    category = raw.get("category")
    if category is not None and not isinstance(category, str):
        raise ConfigError(f"{where}category must be a string or null, got {category!r}")
    d = raw.get("defects")
    glob = _flatten_block({} if d is None else d, "defects", source)
    out = {"": _make(glob, "defects.", source)}
    cats = raw.get("per_category", {})
    if cats is None:
        cats = {}
    if not isinstance(cats, dict):
        raise ConfigError(f"{where}per_category must be a JSON object, got {cats!r}")
    for name, entry in cats.items():
        at = f"per_category.{name}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}{at} must be a JSON object, got {entry!r}")
        _typo_check(entry, ("defects",), (), f"{where}{at}: unknown key")
        d = entry.get("defects")
        block = _flatten_block({} if d is None else d, at + ".defects", source)
        out[name] = _make(_merge(glob, block), at + ".defects.", source)
    return out


def load_config(
    path_or_dict: Union[str, "os.PathLike[str]", Dict[str, Any]],
    category: Optional[str] = None,
) -> DefectsConfig:
    """Load a config file (or dict) into a :class:`DefectsConfig`.

    The ``defects`` block is the base; ``per_category[category].defects`` is merged over it
    key by key. A category that sets ``pixel_threshold`` without
    ``pixel_threshold_provenance`` gets no provenance (not the global one). The whole file
    is validated, every category included. A pyimgano ``infer_config.json`` works as is:
    its ``defects`` block uses the same key names (nested ``map_smoothing``,
    ``hysteresis``, ``shape_filters`` and ``merge_nearby`` included) and its other keys are
    ignored. Provenance in torchdefects' older vocabulary is converted
    (:func:`upgrade_provenance`).

    Args:
        path_or_dict: a JSON file path, or the parsed dict.
        category: which ``per_category`` entry to apply. ``None``: the file's top-level
            ``category`` (pyimgano's workbench export; ``"all"`` counts as none) when it
            has one, else the only category, else an error listing several; with no
            categories, the global block. A ``category`` the file lacks is an error listing
            the known ones, unless the file has no categories (global block).

    Returns:
        the validated config; ``pixel_threshold_provenance`` and ``mask_format`` included.

    Raises:
        ConfigError: unreadable file, bad JSON, unknown key, wrong type or value, category
            problem, a feature not supported yet; the message starts with the path and
            names the field path.

    Example:
        >>> cfg = load_config({"defects": {"pixel_threshold": 0.5, "min_area": 4}})
        >>> cfg.pixel_threshold, cfg.min_area
        (0.5, 4)
    """
    if isinstance(path_or_dict, dict):
        raw, source = path_or_dict, None
    elif isinstance(path_or_dict, (str, os.PathLike)):
        source = os.fspath(path_or_dict)
        raw = read_config_dict(source)
    else:
        raise ConfigError(f"config must be a path or a dict, got {type(path_or_dict).__name__}")
    configs = validate_config_dict(raw, source)
    known = sorted(k for k in configs if k)
    if category is None:
        top = raw.get("category")
        if isinstance(top, str) and top.lower() != "all":
            category = top
    if category is None:
        if len(known) > 1:
            raise ConfigError(
                f"{_where(source)}the config has several categories ({', '.join(known)}); "
                "choose one with category= (--category)"
            )
        return configs[known[0]] if known else configs[""]
    if category in configs and category != "":
        return configs[category]
    if not known:
        return configs[""]
    raise ConfigError(
        f"{_where(source)}unknown category {category!r}; known categories: {', '.join(known)}"
    )


# ----------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------


def save_config(config_or_dict: Union[DefectsConfig, Dict[str, Any]], path: str) -> None:
    """Validate and write a config file atomically (JSON, 2-space indent).

    Args:
        config_or_dict: a :class:`DefectsConfig` (written as the ``defects`` block with
            ``schema_version``) or a whole config dict (written as given, keys outside the
            ``defects`` blocks included: a pyimgano ``infer_config.json`` keeps its keys;
            a NaN or infinity among them, which pyimgano's reports can hold, is written as
            ``null``, as strict JSON requires).
        path: destination.

    ``load_config(path) == config`` after ``save_config(config, path)``.

    Raises:
        ConfigError: the config is invalid (nothing is written).
    """
    from torchdefects.files import atomic_write_json

    if isinstance(config_or_dict, DefectsConfig):
        config_or_dict.validate()
        raw: Dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "defects": config_or_dict.to_dict(),
        }
    elif isinstance(config_or_dict, dict):
        raw = config_or_dict
        validate_config_dict(raw)
    else:
        raise TypeError(
            f"config must be a DefectsConfig or a dict, got {type(config_or_dict).__name__}"
        )
    try:
        # NaN outside the validated blocks (a pyimgano report's metric) is written as null.
        json.dumps(raw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{os.fspath(path)}: config is not plain JSON: {e}") from e
    atomic_write_json(os.fspath(path), raw)


def set_pixel_threshold(
    raw: Dict[str, Any],
    threshold: float,
    provenance: Optional[Dict[str, Any]],
    category: Optional[str] = None,
    roi_xyxy_norm: Optional[List[float]] = None,
) -> Dict[str, Any]:
    """A copy of config dict ``raw`` with the threshold (and provenance) set.

    Written into ``defects`` or, with ``category``, into ``per_category.<category>.defects``
    (created as needed). ``roi_xyxy_norm``, when given, is written next to it, so the ROI
    the threshold was calibrated on is the ROI it is used with. Adds ``schema_version`` when
    the file has none; an existing one (pyimgano's 1) is kept so pyimgano still reads it.
    """
    out = json.loads(json.dumps(raw))  # deep copy, JSON only
    out.setdefault("schema_version", SCHEMA_VERSION)
    if category is None:
        block = out.setdefault("defects", {})
    else:
        cats = out.get("per_category") or {}
        out["per_category"] = cats
        entry = cats.setdefault(category, {})
        block = entry.setdefault("defects", {})
    block["pixel_threshold"] = float(threshold)
    block["pixel_threshold_provenance"] = provenance
    if roi_xyxy_norm is not None:
        block["roi_xyxy_norm"] = [float(v) for v in roi_xyxy_norm]
    return out


# ----------------------------------------------------------------------------
# Documentation
# ----------------------------------------------------------------------------


def _md(value: Any) -> str:
    return "`" + json.dumps(value) + "`"


def config_docs_markdown() -> str:
    """The text of ``docs/config.md``, generated from the fields' metadata (a test compares)."""
    lines = [
        "# Configuration fields",
        "",
        "<!-- Generated by torchdefects.config.config_docs_markdown(); do not edit by hand. -->",
        "",
        "Every field of `DefectsConfig`: a key of a config file's `defects` block (pyimgano's",
        "names), a keyword of `DefectsConfig(...)`, and a flag of `torchdefects run`. pyimgano's",
        "nested forms (`map_smoothing.method`, `hysteresis.low`, `shape_filters.min_solidity`,",
        '`merge_nearby.max_gap_px`, ...) are read into the flat fields. "Not supported yet"',
        "fields accept only the neutral value shown until their stage lands",
        "(`UNSUPPORTED_UNTIL_IMPLEMENTED`). The oracle is what the stage is tested against.",
        "",
        "| field | default | flag | meaning | oracle |",
        "|---|---|---|---|---|",
    ]
    for f in fields(DefectsConfig):
        if f.name.startswith("_"):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        meta = f.metadata
        flags = [] if meta.get("cli", True) is False else [field_flag(f)]
        flags += list(meta.get("aliases", ()))
        flag = ", ".join(f"`{x}`" for x in flags) or "-"
        text = meta["help"]
        if "choices" in meta:
            text += " (one of " + ", ".join(_md(c) for c in meta["choices"]) + ")"
        if f.name in UNSUPPORTED_UNTIL_IMPLEMENTED:
            text += f"; not supported yet: only {_md(UNSUPPORTED_UNTIL_IMPLEMENTED[f.name])}"
        text = text.replace("|", "\\|")
        lines.append(
            f"| `{f.name}` | {_md(default)} | {flag} | {text} | {meta.get('oracle', '-')} |"
        )
    lines += [
        "",
        "## Kernel sizes",
        "",
        "`open_ksize`, `close_ksize`, `mask_dilate_ksize` and `map_smoothing_ksize` are at most",
        f"{KSIZE_MAX}. A k x k window centred on any pixel of an H x W map covers the whole map",
        "once k >= 2 max(H, W) + 1, so any larger window gives the same result as that one: a",
        f"cap loses nothing on maps up to {(KSIZE_MAX - 1) // 2} px a side (500 px of margin",
        "either way), and it keeps a typo such as 100000001 from taking seconds or gigabytes.",
        "",
        "## Config files",
        "",
        "Numbers outside the int64 / float64 range, nesting deeper than 64 levels and files",
        "over 64 MiB are errors naming the path in the file (`torchdefects run` exits 2).",
        "Typos of `defects` or `per_category` (top level) and of `defects` (inside a category)",
        "are errors with a did-you-mean, as are unknown keys inside a `defects` block.",
        "",
    ]
    return "\n".join(lines)
