import json
import re
from pathlib import Path

import pytest

from torchdefects.presets import PRESETS, list_presets, preset_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "presets.md"


def test_names_and_copies():
    assert list_presets() == sorted(PRESETS)
    a = preset_config("industrial-defects-fp40")
    a["min_area"] = 0
    assert preset_config("industrial-defects-fp40")["min_area"] == 16
    json.dumps(a)  # JSON-friendly


def test_pyimgano_fp40_flattened():
    # pyimgano's catalog payload, nested blocks flattened to the config keys.
    p = preset_config("industrial-defects-fp40")
    assert p["map_smoothing_method"] == "median" and p["map_smoothing_ksize"] == 3
    assert p["hysteresis_enabled"] is True and p["hysteresis_low"] is None
    assert (p["min_fill_ratio"], p["max_aspect_ratio"], p["min_solidity"]) == (0.15, 6.0, 0.8)
    assert p["merge_nearby_enabled"] is True and p["merge_nearby_max_gap_px"] == 1
    assert p["border_ignore_px"] == 2 and p["roi_xyxy_norm"] == [0.1, 0.1, 0.9, 0.9]


def test_unknown_name():
    with pytest.raises(ValueError, match=re.escape("did you mean 'fragments'")):
        preset_config("fragment")
    with pytest.raises(ValueError, match="defects preset must be one of"):
        preset_config("nothing-like-it")


def test_documented():
    doc = DOC.read_text()
    for name in list_presets():
        assert f"`{name}`" in doc
