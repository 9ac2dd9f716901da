"""Named bundles of defects settings (``--defects-preset NAME``), documented in docs/presets.md.

A preset is a dict of :class:`~torchdefects.DefectsConfig` keys (pyimgano's names) that is
applied before the config file's and the command line's own values, which win.
``industrial-defects-fp40`` is pyimgano's preset of that name, its nested blocks
(``map_smoothing``, ``hysteresis``, ``shape_filters``, ``merge_nearby``) flattened to the
config's keys; its run options (``pixel_threshold_strategy``, ``pixel_normal_quantile``,
``mask_format``) are not defects keys and are listed in :data:`PRESET_RUN_OPTIONS`.
"""

import copy
import difflib
from typing import Any, Dict, List, Tuple

__all__ = ["PRESETS", "PRESET_RUN_OPTIONS", "list_presets", "preset_config"]

PRESETS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "industrial-defects-fp40": (
        "pyimgano's false-positive reduction bundle: ROI, border, median smoothing, "
        "hysteresis, shape filters, merging, min_area 16, min_score_max 0.6, 20 regions.",
        {
            "roi_xyxy_norm": [0.1, 0.1, 0.9, 0.9],
            "border_ignore_px": 2,
            "map_smoothing_method": "median",
            "map_smoothing_ksize": 3,
            "map_smoothing_sigma": 0.0,
            "hysteresis_enabled": True,
            "hysteresis_low": None,
            "hysteresis_high": None,
            "min_fill_ratio": 0.15,
            "max_aspect_ratio": 6.0,
            "min_solidity": 0.8,
            "merge_nearby_enabled": True,
            "merge_nearby_max_gap_px": 1,
            "min_area": 16,
            "min_score_max": 0.6,
            "min_score_mean": None,
            "open_ksize": 0,
            "close_ksize": 0,
            "fill_holes": False,
            "max_regions": 20,
            "max_regions_sort_by": "score_max",
        },
    ),
    "speckle": (
        "Noisy maps: gaussian smoothing (5x5) and hysteresis (seeds at the threshold, "
        "grown down to half of it), small regions dropped.",
        {
            "map_smoothing_method": "gaussian",
            "map_smoothing_ksize": 5,
            "map_smoothing_sigma": 0.0,
            "hysteresis_enabled": True,
            "min_area": 8,
        },
    ),
    "fragments": (
        "Broken-up defects (scratches seen in pieces): fragments within 3 px merge into one "
        "region, and the mask is dilated by a 3x3 ellipse.",
        {
            "merge_nearby_enabled": True,
            "merge_nearby_max_gap_px": 3,
            "mask_dilate_ksize": 3,
            "max_regions_sort_by": "area",
        },
    ),
    "compact": (
        "Blob-like defects only (spots, dents, holes): thin, sparse or ragged regions are "
        "dropped by fill ratio, aspect ratio and solidity.",
        {
            "min_fill_ratio": 0.5,
            "max_aspect_ratio": 3.0,
            "min_solidity": 0.85,
            "min_area": 4,
        },
    ),
}

# pyimgano's preset also sets these run options (not DefectsConfig keys).
PRESET_RUN_OPTIONS: Dict[str, Dict[str, Any]] = {
    "industrial-defects-fp40": {
        "pixel_threshold_strategy": "normal_pixel_quantile",
        "pixel_normal_quantile": 0.999,
        "mask_format": "png",
    },
}


def list_presets() -> List[str]:
    """Preset names, sorted.

    Example:
        >>> list_presets()
        ['compact', 'fragments', 'industrial-defects-fp40', 'speckle']
    """
    return sorted(PRESETS)


def preset_config(name: str) -> Dict[str, Any]:
    """The config keys of preset ``name`` (a fresh copy).

    Raises:
        ValueError: unknown name (the message lists the presets and a close match).

    Example:
        >>> preset_config("fragments")["merge_nearby_max_gap_px"]
        3
    """
    if not isinstance(name, str) or name not in PRESETS:
        close = difflib.get_close_matches(str(name), list(PRESETS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"defects preset must be one of {', '.join(list_presets())}, got {name!r}{hint}"
        )
    return copy.deepcopy(PRESETS[name][1])
