"""``DefectsConfig`` and the JSON config file: settings of the defect pipeline, validated once.

The file::

    {"schema_version": 1,
     "defects": {"pixel_threshold": 0.53, "pixel_threshold_provenance": {...},
                 "roi_xyxy_norm": [0.1, 0.1, 0.9, 0.9], "open_ksize": 3, "close_ksize": 3,
                 "fill_holes": true, "min_area": 16, "max_regions": 20, "connectivity": 8,
                 "mask_format": "png"},
     "per_category": {"bottle": {"defects": {"pixel_threshold": 0.61}}}}

Every key is optional. A ``defects`` block accepts exactly the fields of
:class:`DefectsConfig`; any other key inside one is an error. Keys outside the ``defects``
blocks (other top-level keys, other keys of a category entry) belong to other tools, such as
the rest of a pyimgano ``infer_config.json``, and are ignored, except a near-miss of
``defects`` or ``per_category`` (a typo), which is an error.
"""

import difflib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional, Union

from torchdefects._check import (
    check_bool,
    check_choice,
    check_finite,
    check_int,
    check_ksize,
    check_roi,
)

__all__ = [
    "SCHEMA_VERSION",
    "ConfigError",
    "DefectsConfig",
    "load_config",
    "read_config_dict",
    "save_config",
    "set_pixel_threshold",
    "validate_config_dict",
]

SCHEMA_VERSION = 1
MASK_FORMATS = ("png", "npy", "npz")
PROVENANCE_SOURCES = ("explicit", "config", "calibration")


class ConfigError(ValueError):
    """A config file or dict is invalid; the message names the file and the field path."""


@dataclass
class DefectsConfig:
    """Settings of :class:`~torchdefects.DefectHead`; names follow pyimgano's ``defects`` block.

    Args:
        pixel_threshold: a map pixel ``>=`` this is foreground; ``None`` means it must be
            given per call or resolved from calibration.
        roi_xyxy_norm: region of interest ``[x1, y1, x2, y2]`` in [0, 1] (clamped and
            reordered); ``None`` is the whole map.
        open_ksize: side of the square opening (0 = off, else odd >= 3).
        close_ksize: side of the square closing (0 = off, else odd >= 3).
        fill_holes: fill background not 4-connected to the border.
        min_area: drop components with fewer pixels.
        max_regions: keep at most this many regions per image (``None`` = all).
        connectivity: 4 or 8.
        pixel_threshold_provenance: where ``pixel_threshold`` came from (a JSON object with
            ``source`` one of ``explicit``, ``config``, ``calibration``; see
            ``docs/calibration.md``), or ``None``.
        mask_format: how ``torchdefects run`` writes masks: ``png``, ``npy`` or ``npz``.
        image_threshold: an image is labelled defective when its image score is ``>=`` this;
            ``None`` labels an image defective when it has any reported region.

    Raises:
        ValueError, TypeError: a field is out of range; the message names the field.
    """

    pixel_threshold: Optional[float] = None
    roi_xyxy_norm: Optional[List[float]] = None
    open_ksize: int = 0
    close_ksize: int = 0
    fill_holes: bool = False
    min_area: int = 0
    max_regions: Optional[int] = None
    connectivity: int = 8
    pixel_threshold_provenance: Optional[Dict[str, Any]] = None
    mask_format: str = "png"
    image_threshold: Optional[float] = None
    _prefix: str = field(default="", repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate(self._prefix)

    def validate(self, prefix: str = "") -> None:
        """Check every field; ``prefix`` is put before field names in messages."""
        p = prefix
        check_finite(p + "pixel_threshold", self.pixel_threshold, allow_none=True)
        check_roi(p + "roi_xyxy_norm", self.roi_xyxy_norm)
        check_ksize(p + "open_ksize", self.open_ksize)
        check_ksize(p + "close_ksize", self.close_ksize)
        check_bool(p + "fill_holes", self.fill_holes)
        check_int(p + "min_area", self.min_area, minimum=0)
        check_int(p + "max_regions", self.max_regions, minimum=1, allow_none=True)
        check_choice(p + "connectivity", self.connectivity, (4, 8))
        _check_provenance(p + "pixel_threshold_provenance", self.pixel_threshold_provenance)
        check_choice(p + "mask_format", self.mask_format, MASK_FORMATS)
        check_finite(p + "image_threshold", self.image_threshold, allow_none=True)
        if self.pixel_threshold is not None:
            self.pixel_threshold = float(self.pixel_threshold)
        if self.image_threshold is not None:
            self.image_threshold = float(self.image_threshold)
        if self.roi_xyxy_norm is not None:
            self.roi_xyxy_norm = [float(v) for v in self.roi_xyxy_norm]

    def to_dict(self) -> Dict[str, Any]:
        """The fields as a JSON-ready dict (the ``defects`` block of a config file)."""
        d = asdict(self)
        d.pop("_prefix")
        return d


def _check_provenance(name: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be a JSON object or null, got {value!r}")
    source = value.get("source")
    if source not in PROVENANCE_SOURCES:
        allowed = ", ".join(repr(s) for s in PROVENANCE_SOURCES)
        raise ValueError(f"{name}.source must be one of {allowed}, got {source!r}")
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be plain JSON (no NaN or infinity): {e}") from e


#: Keys a ``defects`` block may hold.
DEFECTS_KEYS = tuple(f.name for f in fields(DefectsConfig) if not f.name.startswith("_"))


# ----------------------------------------------------------------------------
# Reading and validating
# ----------------------------------------------------------------------------


def read_config_dict(path: str) -> Dict[str, Any]:
    """The JSON object in ``path``, not yet validated.

    Raises:
        ConfigError: the file is missing, unreadable, not JSON or not an object; the message
            starts with the path (and gives line and column for JSON syntax errors).
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror or e}") from e
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: config must be a JSON object, got {type(raw).__name__}")
    return raw


def _where(source: Optional[str]) -> str:
    return f"{source}: " if source else ""


def _check_block(block: Any, path: str, source: Optional[str]) -> Dict[str, Any]:
    if not isinstance(block, dict):
        raise ConfigError(f"{_where(source)}{path} must be a JSON object, got {block!r}")
    for key in block:
        if key not in DEFECTS_KEYS:
            raise ConfigError(
                f"{_where(source)}{path}: unknown key {key!r} (at {path}.{key}); allowed keys: "
                + ", ".join(DEFECTS_KEYS)
            )
    return block


def _make(values: Dict[str, Any], prefix: str, source: Optional[str]) -> DefectsConfig:
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


def _typo_check(raw: Dict[str, Any], source: Optional[str]) -> None:
    for key in raw:
        if key in ("defects", "per_category", "schema_version"):
            continue
        close = difflib.get_close_matches(key, ("defects", "per_category"), n=1, cutoff=0.8)
        if close:
            raise ConfigError(
                f"{_where(source)}unknown top-level key {key!r}; did you mean {close[0]!r}?"
            )


def validate_config_dict(raw: Any, source: Optional[str] = None) -> Dict[str, DefectsConfig]:
    """Validate a whole config; return the global config and every category's merged one.

    Returns:
        ``{"": global_config, "bottle": merged_config, ...}``.

    Raises:
        ConfigError: the message names ``source`` (a path) and the field path.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{_where(source)}config must be a JSON object, got {type(raw).__name__}")
    _typo_check(raw, source)
    if "schema_version" in raw:
        v = raw["schema_version"]
        if v != SCHEMA_VERSION or isinstance(v, bool):
            raise ConfigError(f"{_where(source)}schema_version must be {SCHEMA_VERSION}, got {v!r}")
    glob = _check_block(raw.get("defects", {}), "defects", source)
    out = {"": _make(glob, "defects.", source)}
    cats = raw.get("per_category", {})
    if cats is None:
        cats = {}
    if not isinstance(cats, dict):
        raise ConfigError(f"{_where(source)}per_category must be a JSON object, got {cats!r}")
    for name, entry in cats.items():
        where = f"per_category.{name}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{_where(source)}{where} must be a JSON object, got {entry!r}")
        block = _check_block(entry.get("defects", {}), where + ".defects", source)
        out[name] = _make(_merge(glob, block), where + ".defects.", source)
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
    its ``defects`` block uses the same key names and its other keys are ignored.

    Args:
        path_or_dict: a JSON file path, or the parsed dict.
        category: which ``per_category`` entry to apply. ``None`` with exactly one category
            applies that one; ``None`` with several is an error listing them; ``None``
            with none gives the global block. A ``category`` the file lacks is an error
            listing the known ones, unless the file has no categories (global block).

    Returns:
        the validated config; ``pixel_threshold_provenance`` and ``mask_format`` included.

    Raises:
        ConfigError: unreadable file, bad JSON, unknown key, wrong type or value, category
            problem; the message starts with the path and names the field path.

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
            ``defects`` blocks included).
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
        json.dumps(raw, allow_nan=False)
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
    the threshold was calibrated on is the ROI it is used with. Adds ``schema_version``.
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
