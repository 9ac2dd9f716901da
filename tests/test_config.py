import json
import os

import pytest

from torchdefects.config import (
    DEFECTS_KEYS,
    ConfigError,
    DefectsConfig,
    load_config,
    read_config_dict,
    save_config,
    set_pixel_threshold,
)

PROV = {"source": "train_dir", "method": "normal_pixel_quantile", "q": 0.999}

FULL = {
    "schema_version": 2,
    "defects": {
        "pixel_threshold": 0.53,
        "pixel_threshold_provenance": PROV,
        "roi_xyxy_norm": [0.1, 0.1, 0.9, 0.9],
        "open_ksize": 3,
        "close_ksize": 3,
        "fill_holes": True,
        "min_area": 16,
        "max_regions": 20,
        "connectivity": 8,
        "mask_format": "png",
        "image_threshold": None,
    },
    "per_category": {
        "bottle": {"defects": {"pixel_threshold": 0.61, "roi_xyxy_norm": [0, 0, 1, 0.8]}},
        "cable": {"defects": {"min_area": 4, "mask_format": "npz"}},
    },
}


def _write(tmp_path, obj, name="c.json"):
    p = str(tmp_path / name)
    with open(p, "w") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj))
    return p


# ----------------------------------------------------------------------------
# Loading, merging, round trip
# ----------------------------------------------------------------------------


def test_defaults_and_keys():
    cfg = load_config({})
    assert cfg == DefectsConfig()
    assert cfg.mask_format == "png" and cfg.pixel_threshold_provenance is None
    assert set(DEFECTS_KEYS) == set(DefectsConfig().to_dict())
    assert set(FULL["defects"]) <= set(DEFECTS_KEYS)


def test_global_block(tmp_path):
    cfg = load_config({"defects": FULL["defects"]})
    assert cfg.pixel_threshold == 0.53
    assert cfg.pixel_threshold_provenance == PROV
    assert cfg.roi_xyxy_norm == [0.1, 0.1, 0.9, 0.9]
    assert (cfg.open_ksize, cfg.close_ksize, cfg.fill_holes) == (3, 3, True)
    assert (cfg.min_area, cfg.max_regions, cfg.connectivity, cfg.mask_format) == (16, 20, 8, "png")


def test_per_category_merge(tmp_path):
    p = _write(tmp_path, FULL)
    bottle = load_config(p, "bottle")
    assert bottle.pixel_threshold == 0.61
    assert bottle.roi_xyxy_norm == [0.0, 0.0, 1.0, 0.8]
    assert bottle.min_area == 16 and bottle.open_ksize == 3  # inherited
    # its own threshold does not inherit the global threshold's provenance
    assert bottle.pixel_threshold_provenance is None
    cable = load_config(p, "cable")
    assert cable.pixel_threshold == 0.53 and cable.pixel_threshold_provenance == PROV
    assert (cable.min_area, cable.mask_format) == (4, "npz")


def test_single_category_applies_without_name():
    raw = {"defects": {"min_area": 1}, "per_category": {"bottle": {"defects": {"min_area": 9}}}}
    assert load_config(raw).min_area == 9


def test_category_with_no_categories_uses_global():
    assert load_config({"defects": {"min_area": 3}}, "bottle").min_area == 3


def test_pyimgano_infer_config(tmp_path):
    infer = {
        "model": {"name": "patchcore", "checkpoint": "model.pt"},
        "threshold": 0.42,
        "preprocessing": {"resize": [256, 256]},
        "defects": {"pixel_threshold": 0.5, "roi_xyxy_norm": None, "min_area": 8},
    }
    cfg = load_config(_write(tmp_path, infer, "infer_config.json"))
    assert (cfg.pixel_threshold, cfg.min_area, cfg.roi_xyxy_norm) == (0.5, 8, None)


def test_extra_keys_in_category_entry_are_ignored():
    raw = {"per_category": {"bottle": {"threshold": 1, "defects": {"min_area": 2}}}}
    assert load_config(raw, "bottle").min_area == 2


def test_round_trip_dataclass(tmp_path):
    cfg = DefectsConfig(
        pixel_threshold=0.25,
        roi_xyxy_norm=[0.0, 0.1, 0.5, 1.0],
        open_ksize=5,
        close_ksize=0,
        fill_holes=True,
        min_area=3,
        max_regions=None,
        connectivity=4,
        pixel_threshold_provenance=PROV,
        mask_format="npy",
    )
    p = str(tmp_path / "x.json")
    save_config(cfg, p)
    assert load_config(p) == cfg
    assert read_config_dict(p)["schema_version"] == 2
    save_config(load_config(p), p)
    assert load_config(p) == cfg


def test_round_trip_dict(tmp_path):
    p = str(tmp_path / "x.json")
    save_config(FULL, p)
    assert read_config_dict(p) == FULL
    for cat in ("bottle", "cable"):
        assert load_config(p, cat) == load_config(FULL, cat)


def test_to_dict_is_json_ready():
    d = DefectsConfig(pixel_threshold=1, pixel_threshold_provenance=PROV).to_dict()
    assert json.loads(json.dumps(d, allow_nan=False)) == d
    assert "_prefix" not in d


def test_set_pixel_threshold():
    raw = {"model": "x", "defects": {"min_area": 2}}
    out = set_pixel_threshold(raw, 0.7, PROV)
    assert raw == {"model": "x", "defects": {"min_area": 2}}  # not mutated
    assert out["defects"] == {
        "min_area": 2,
        "pixel_threshold": 0.7,
        "pixel_threshold_provenance": PROV,
    }
    assert out["schema_version"] == 2 and out["model"] == "x"
    # an existing schema_version (pyimgano's 1) is kept, so pyimgano still reads the file
    assert set_pixel_threshold({"schema_version": 1}, 0.7, PROV)["schema_version"] == 1
    out = set_pixel_threshold(out, 0.9, PROV, category="bottle", roi_xyxy_norm=[0, 0, 1, 0.5])
    assert out["per_category"]["bottle"]["defects"]["pixel_threshold"] == 0.9
    cfg = load_config(out, "bottle")
    assert (cfg.pixel_threshold, cfg.roi_xyxy_norm, cfg.min_area) == (0.9, [0, 0, 1, 0.5], 2)


def test_save_invalid_writes_nothing(tmp_path):
    p = str(tmp_path / "x.json")
    with pytest.raises(ConfigError, match=r"defects\.min_area must be an integer >= 0, got -1"):
        save_config({"defects": {"min_area": -1}}, p)
    assert not os.path.exists(p)
    with pytest.raises(TypeError, match="config must be a DefectsConfig or a dict, got list"):
        save_config([], p)


# ----------------------------------------------------------------------------
# Every validation message
# ----------------------------------------------------------------------------


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"nope\.json: cannot read config"):
        load_config(str(tmp_path / "nope.json"))
    p = _write(tmp_path, '{"defects": {"min_area": 3,}}')
    with pytest.raises(ConfigError, match=r"c\.json: not valid JSON: .* at line 1 column"):
        load_config(p)
    p = _write(tmp_path, "[1, 2]")
    with pytest.raises(ConfigError, match=r"c\.json: config must be a JSON object, got list"):
        load_config(p)
    with pytest.raises(ConfigError, match="config must be a path or a dict, got list"):
        load_config([1])


def test_nan_in_file(tmp_path):
    p = _write(tmp_path, '{"defects": {"pixel_threshold": NaN}}')
    with pytest.raises(ConfigError, match=r"c\.json: defects\.pixel_threshold must be finite"):
        load_config(p)


STRUCTURE_ERRORS = [
    ({"defect": {}}, "unknown top-level key 'defect'; did you mean 'defects'?"),
    ({"per_categroy": {}}, "unknown top-level key 'per_categroy'; did you mean 'per_category'?"),
    ({"schema_version": 3}, "schema_version must be 1 or 2, got 3"),
    ({"schema_version": True}, "schema_version must be 1 or 2, got True"),
    ({"defects": [1]}, "defects must be a JSON object, got [1]"),
    ({"per_category": [1]}, "per_category must be a JSON object, got [1]"),
    ({"per_category": {"bottle": 3}}, "per_category.bottle must be a JSON object, got 3"),
    (
        {"per_category": {"bottle": {"defects": 3}}},
        "per_category.bottle.defects must be a JSON object, got 3",
    ),
    (
        {"defects": {"min_aera": 3}},
        "defects: unknown key 'min_aera' (at defects.min_aera); did you mean 'min_area'? "
        "allowed keys: enabled, pixel_threshold, ",
    ),
    (
        {"per_category": {"bottle": {"defects": {"threshold": 3}}}},
        "per_category.bottle.defects: unknown key 'threshold' "
        "(at per_category.bottle.defects.threshold); did you mean 'pixel_threshold'? allowed keys: ",
    ),
    ({"defects": {"_prefix": "x"}}, "unknown key '_prefix'"),
]


@pytest.mark.parametrize("raw,msg", STRUCTURE_ERRORS)
def test_structure_errors(tmp_path, raw, msg):
    with pytest.raises(ConfigError) as e:
        load_config(raw)
    assert msg in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, raw))
    assert str(e.value).startswith(str(tmp_path / "c.json") + ": ")
    assert msg in str(e.value)


FIELD_ERRORS = [
    ("pixel_threshold", "0.5", "pixel_threshold must be a number or None, got '0.5' (str)"),
    ("pixel_threshold", True, "pixel_threshold must be a number or None, got True (bool)"),
    ("pixel_threshold", float("inf"), "pixel_threshold must be finite, got inf"),
    ("roi_xyxy_norm", [0, 1], "roi_xyxy_norm must be four numbers [x1, y1, x2, y2] in [0, 1]"),
    ("roi_xyxy_norm", "0 0 1 1", "roi_xyxy_norm must be four numbers"),
    ("roi_xyxy_norm", [0, "a", 1, 1], "roi_xyxy_norm[1] must be a finite number, got 'a'"),
    ("open_ksize", 4, "open_ksize must be 0 or an odd integer >= 3, got 4"),
    ("open_ksize", 1, "open_ksize must be 0 or an odd integer >= 3, got 1"),
    ("close_ksize", 2.0, "close_ksize must be 0 or an odd integer >= 3, got 2.0"),
    ("fill_holes", 1, "fill_holes must be true or false, got 1"),
    ("min_area", -1, "min_area must be an integer >= 0, got -1"),
    ("min_area", "3", "min_area must be an integer, got '3' (str)"),
    ("max_regions", 0, "max_regions must be an integer >= 1 or None, got 0"),
    ("max_regions", 2.5, "max_regions must be an integer or None, got 2.5 (float)"),
    ("connectivity", 6, "connectivity must be one of 4, 8, got 6"),
    ("connectivity", True, "connectivity must be one of 4, 8, got True"),
    ("connectivity", 8.0, "connectivity must be one of 4, 8, got 8.0"),
    ("pixel_threshold_provenance", "calib", "pixel_threshold_provenance must be a JSON object"),
    (
        "pixel_threshold_provenance",
        {"source": "guess"},
        "pixel_threshold_provenance.source must be one of 'explicit', 'infer_config', "
        "'train_dir', got 'guess'",
    ),
    (
        "pixel_threshold_provenance",
        {"source": "explicit", "x": float("nan")},
        "pixel_threshold_provenance must be plain JSON (no NaN or infinity)",
    ),
    ("mask_format", "jpg", "mask_format must be one of 'png', 'npy', 'npz', got 'jpg'"),
]


@pytest.mark.parametrize("key,value,msg", FIELD_ERRORS)
def test_field_errors_name_the_path(key, value, msg):
    with pytest.raises(ConfigError) as e:
        load_config({"defects": {key: value}})
    assert "defects." + msg in str(e.value)
    # in a category, whichever category is asked for (all are validated)
    raw = {"per_category": {"bottle": {"defects": {key: value}}, "cable": {}}}
    with pytest.raises(ConfigError) as e:
        load_config(raw, "cable")
    assert "per_category.bottle.defects." + msg in str(e.value)
    with pytest.raises((TypeError, ValueError)) as e:
        DefectsConfig(**{key: value})
    assert msg in str(e.value)


def test_issue_example_message():
    raw = {"per_category": {"bottle": {"defects": {"open_ksize": 4}}}}
    with pytest.raises(ConfigError) as e:
        load_config(raw, "bottle")
    assert (
        str(e.value)
        == "per_category.bottle.defects.open_ksize must be 0 or an odd integer >= 3, got 4"
    )


def test_category_errors(tmp_path):
    p = _write(tmp_path, FULL)
    with pytest.raises(ConfigError, match=r"several categories \(bottle, cable\); choose one"):
        load_config(p)
    with pytest.raises(
        ConfigError, match="unknown category 'bolt'; known categories: bottle, cable"
    ):
        load_config(p, "bolt")


def test_null_blocks():
    assert load_config({"per_category": None}, "a") == DefectsConfig()
    assert load_config({"per_category": {"a": {}}}, "a") == DefectsConfig()
    # pyimgano reads a null block as its defaults
    assert load_config({"defects": None}) == DefectsConfig()
    assert load_config({"per_category": {"a": {"defects": None}}}, "a") == DefectsConfig()
