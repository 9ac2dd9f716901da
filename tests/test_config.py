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
        "image_threshold_provenance": None,
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
    with pytest.raises(TypeError, match=r"config must be a DefectsConfig or a dict, got list"):
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
    with pytest.raises(ConfigError, match=r"config must be a path or a dict, got list"):
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
        "(at per_category.bottle.defects.threshold); did you mean 'pixel_threshold'? "
        "allowed keys: ",
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
        ConfigError, match=r"unknown category 'bolt'; known categories: bottle, cable"
    ):
        load_config(p, "bolt")


def test_null_blocks():
    assert load_config({"per_category": None}, "a") == DefectsConfig()
    assert load_config({"per_category": {"a": {}}}, "a") == DefectsConfig()
    # pyimgano reads a null block as its defaults
    assert load_config({"defects": None}) == DefectsConfig()
    assert load_config({"per_category": {"a": {"defects": None}}}, "a") == DefectsConfig()


# ----------------------------------------------------------------------------
# pyimgano infer_config.json (shapes written from pyimgano's docs and plan)
# ----------------------------------------------------------------------------

import copy  # noqa: E402
import dataclasses  # noqa: E402

from torchdefects.config import (  # noqa: E402
    KSIZE_MAX,
    PROVENANCE_SCHEMA,
    UNSUPPORTED_UNTIL_IMPLEMENTED,
    config_docs_markdown,
    field_flag,
    upgrade_provenance,
)

# pyimgano's `defects` block as its workbench export writes it (nested sub-blocks).
PYIMGANO_DEFECTS = {
    "enabled": True,
    "pixel_threshold": 0.5,
    "pixel_threshold_strategy": "fixed",
    "pixel_normal_quantile": 0.999,
    "mask_format": "png",
    "roi_xyxy_norm": [0.1, 0.1, 0.9, 0.9],
    "border_ignore_px": 0,
    "map_smoothing": {"method": "none", "ksize": 0, "sigma": 0.0},
    "hysteresis": {"enabled": False, "low": None, "high": None},
    "shape_filters": {"min_fill_ratio": None, "max_aspect_ratio": None, "min_solidity": None},
    "merge_nearby": {"enabled": False, "max_gap_px": 0},
    "min_area": 9,
    "min_score_max": None,
    "min_score_mean": None,
    "open_ksize": 3,
    "close_ksize": 5,
    "fill_holes": True,
    "max_regions": 7,
    "max_regions_sort_by": "score_max",
}

WORKBENCH_EXPORT = {
    "schema_version": 1,
    "model": {"name": "vision_patchcore", "device": "cuda", "model_kwargs": {}},
    "adaptation": {"tiling": {"tile_size": None}, "postprocess": None, "save_maps": True},
    "defects": PYIMGANO_DEFECTS,
    "operator_contract": {"schema_version": 1, "runtime_policy": {"defects_enabled": True}},
    "postprocess": {"schema_version": 1, "threshold_scope": "image"},
    "artifact_quality": {"status": "audited", "threshold_scope": "image"},
    "from_run": "/runs/x",
    "threshold": 0.42,
    "threshold_provenance": {"method": "quantile", "quantile": 0.995},
    "checkpoint": {"path": "model.pt"},
    "split_fingerprint": {"sha256": "ab"},
    "category": "bottle",
}

# The plan's flat `defects` block with every key torchdefects reads, at neutral values.
PLAN_DEFECTS_FLAT = {
    "enabled": True,
    "pixel_threshold": 0.5,
    "pixel_threshold_strategy": "normal_pixel_quantile",
    "pixel_normal_quantile": 0.995,
    "pixel_threshold_provenance": {"method": "fixed", "source": "explicit", "value": 0.5},
    "roi_xyxy_norm": None,
    "mask_space": "roi",
    "border_ignore_px": 0,
    "map_smoothing_method": "none",
    "map_smoothing_ksize": 0,
    "map_smoothing_sigma": 0.0,
    "hysteresis_enabled": False,
    "hysteresis_low": None,
    "hysteresis_high": None,
    "open_ksize": 0,
    "close_ksize": 0,
    "fill_holes": False,
    "mask_dilate_ksize": 0,
    "connectivity": 8,
    "min_area": 0,
    "min_score_max": None,
    "min_score_mean": None,
    "min_fill_ratio": None,
    "max_aspect_ratio": None,
    "min_solidity": None,
    "merge_nearby_enabled": False,
    "merge_nearby_max_gap_px": 0,
    "min_score_max_quantile": None,
    "max_regions_sort_by": "score_max",
    "max_regions": None,
    "pixel_size_mm": None,
    "severity_rules": None,
    "image_threshold": None,
    "image_threshold_provenance": None,
    "mask_format": "npz",
}


def test_plan_block_has_every_field():
    assert set(PLAN_DEFECTS_FLAT) == set(DEFECTS_KEYS)
    cfg = load_config({"defects": PLAN_DEFECTS_FLAT})
    assert cfg.to_dict() == {**PLAN_DEFECTS_FLAT, "pixel_normal_quantile": 0.995}


def test_workbench_export_with_category(tmp_path):
    p = _write(tmp_path, WORKBENCH_EXPORT, "infer_config.json")
    cfg = load_config(p)  # "category" is not taken for a typo of "per_category"
    assert cfg.pixel_threshold == 0.5 and cfg.pixel_threshold_strategy == "fixed"
    assert (cfg.open_ksize, cfg.close_ksize, cfg.fill_holes, cfg.min_area) == (3, 5, True, 9)
    assert (cfg.max_regions, cfg.roi_xyxy_norm) == (7, [0.1, 0.1, 0.9, 0.9])
    assert cfg.map_smoothing_method == "none" and cfg.hysteresis_enabled is False
    assert load_config(p, "bottle") == cfg  # no per_category: the global block


def test_top_level_category_selects_the_category():
    raw = copy.deepcopy(WORKBENCH_EXPORT)
    raw["per_category"] = {
        "bottle": {"threshold": 0.3, "metrics": {"auroc": 0.99}, "defects": {"min_area": 2}},
        "cable": {"threshold": 0.4, "defects": {"min_area": 3}},
    }
    assert load_config(raw).min_area == 2  # category: bottle
    assert load_config(raw, "cable").min_area == 3  # an explicit category wins
    raw["category"] = "all"  # pyimgano: "all" selects none
    with pytest.raises(ConfigError, match=r"several categories"):
        load_config(raw)
    raw["category"] = "screw"
    with pytest.raises(ConfigError, match=r"unknown category 'screw'; known categories: bottle"):
        load_config(raw)
    raw["category"] = 3
    with pytest.raises(ConfigError, match=r"category must be a string or null, got 3"):
        load_config(raw)


def test_nested_and_flat_forms_agree():
    nested = {
        "map_smoothing": {"method": "none", "ksize": 5, "sigma": 1.5},
        "hysteresis": {"enabled": False, "low": 0.2, "high": 0.6},
        "shape_filters": {"min_fill_ratio": None},
        "merge_nearby": {"enabled": False, "max_gap_px": 4},
    }
    flat = {
        "map_smoothing_ksize": 5,
        "map_smoothing_sigma": 1.5,
        "hysteresis_low": 0.2,
        "hysteresis_high": 0.6,
        "merge_nearby_max_gap_px": 4,
    }
    assert load_config({"defects": nested}) == load_config({"defects": flat})
    # the same setting twice, differently
    with pytest.raises(
        ConfigError, match=r"defects.hysteresis.low and defects.hysteresis_low both"
    ):
        load_config({"defects": {"hysteresis_low": 0.1, "hysteresis": {"low": 0.2}}})
    with pytest.raises(ConfigError, match=r"defects.hysteresis must be a JSON object or null"):
        load_config({"defects": {"hysteresis": True}})
    assert load_config({"defects": {"hysteresis": None}}) == DefectsConfig()


def test_enabled_false_turns_defects_off():
    assert load_config({"defects": {"enabled": False}}).enabled is False
    with pytest.raises(ConfigError, match=r"defects.enabled must be true or false, got 'no'"):
        load_config({"defects": {"enabled": "no"}})


@pytest.mark.parametrize(
    "raw,msg",
    [
        ({"defect": {}}, "unknown top-level key 'defect'; did you mean 'defects'?"),
        (
            {"per_categroy": {}},
            "unknown top-level key 'per_categroy'; did you mean 'per_category'?",
        ),
        (
            {"per_category": {"bottle": {"defect": {"min_area": 3}}}},
            "per_category.bottle: unknown key 'defect'; did you mean 'defects'?",
        ),
        (
            {"per_category": {"bottle": {"defcts": {}}}},
            "per_category.bottle: unknown key 'defcts'; did you mean 'defects'?",
        ),
        (
            {"defects": {"min_aera": 3}},
            "defects: unknown key 'min_aera' (at defects.min_aera); did you mean 'min_area'?",
        ),
        (
            {"per_category": {"b": {"defects": {"fill_hole": True}}}},
            "per_category.b.defects: unknown key 'fill_hole' (at per_category.b.defects.fill_hole)"
            "; did you mean 'fill_holes'?",
        ),
        (
            {"defects": {"hysteresis": {"enabeld": False}}},
            "defects.hysteresis: unknown key 'enabeld' (at defects.hysteresis.enabeld); "
            "did you mean 'enabled'?",
        ),
        (
            {"defects": {"map_smoothing": {"kernel": 3}}},
            "defects.map_smoothing: unknown key 'kernel' (at defects.map_smoothing.kernel)",
        ),
    ],
)
def test_typos_at_every_level(tmp_path, raw, msg):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, raw))
    assert str(e.value).startswith(str(tmp_path / "c.json") + ": ")
    assert msg in str(e.value)


def test_foreign_keys_near_nothing_are_not_typos():
    raw = {"category": "x", "threshold": 1, "per_category": {"x": {"effects_log": 1}}}
    assert load_config(raw) == DefectsConfig()


# --- numbers out of range, nesting, size ----------------------------------------------


@pytest.mark.parametrize(
    "text,path",
    [
        ('{"defects": {"min_area": ' + "9" * 400 + "}}", "defects.min_area"),
        ('{"defects": {"min_area": -' + "9" * 5000 + "}}", "defects.min_area"),
        ('{"defects": {"max_regions": 9223372036854775808}}', "defects.max_regions"),
        ('{"defects": {"pixel_threshold": 1e400}}', "defects.pixel_threshold"),
        ('{"model": {"seeds": [1, 2, ' + "1" * 30 + "]}}", "model.seeds[2]"),
        (
            '{"per_category": {"b": {"defects": {"open_ksize": 1e999}}}}',
            "per_category.b.defects.open_ksize",
        ),
    ],
)
def test_numbers_out_of_range_name_the_path(tmp_path, text, path):
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: {path}: number ") and "outside the int64/float64 range" in msg
    assert len(msg) < 300  # a 5000-digit number is not echoed


def test_int64_edges_are_read():
    text = '{"model": {"a": 9223372036854775807, "b": -9223372036854775808}}'
    assert load_config(json.loads(text)) == DefectsConfig()


def test_python_dict_with_huge_int_names_the_path():
    with pytest.raises(ConfigError, match=r"^defects.min_area: integer of 1329 bits is outside"):
        load_config({"defects": {"min_area": 10**400}})
    with pytest.raises(ConfigError, match=r"^model.x\[0\]: integer of 16610 bits"):
        load_config({"model": {"x": [10**5000]}})


def test_deep_nesting_names_the_path(tmp_path):
    depth = 100_000
    text = '{"model": {"x": ' + "[" * depth + "]" * depth + "}}"
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: model.x[0][0]") and "nesting deeper than 64 levels" in msg
    deep_obj = '{"a": ' * depth + "1" + "}" * depth
    with pytest.raises(ConfigError, match=r": a\.a\.a.*nesting deeper"):
        load_config(_write(tmp_path, deep_obj, "d.json"))
    # deeper than the limit but within what json parses: the walk names the path
    mid = '{"model": {"y": ' + "[" * 100 + "]" * 100 + "}}"
    with pytest.raises(ConfigError, match=r"mid.json: model\.y(\[0\]){62}: nesting deeper"):
        load_config(_write(tmp_path, mid, "mid.json"))
    # keys with escapes and brackets inside strings do not confuse the path
    ok = '{"model": {"we\\"ird[{": "]}]", "n": [[[1]]]}, "defects": {"min_area": 2}}'
    assert load_config(_write(tmp_path, ok, "ok.json")).min_area == 2


def test_deep_python_dict_does_not_recurse():
    d: dict = {}
    cur = d
    for _ in range(100_000):
        cur["x"] = {}
        cur = cur["x"]
    with pytest.raises(ConfigError, match=r"^model(\.x){63}: nesting deeper than 64 levels"):
        load_config({"model": d})
    shallow = {"a": {"b": [[{"c": [1]}]]}}
    assert load_config({"model": shallow}) == DefectsConfig()


def test_oversized_file(tmp_path, monkeypatch):
    import torchdefects.config as config_mod

    monkeypatch.setattr(config_mod, "MAX_CONFIG_BYTES", 100)
    p = _write(tmp_path, {"model": "x" * 200})
    with pytest.raises(ConfigError, match=r"config is 101 bytes; at most 100|at most 100"):
        load_config(p)


def test_cli_exit_code_2_on_bad_config(tmp_path, capsys):
    from torchdefects.cli import main

    maps = tmp_path / "maps"
    maps.mkdir()
    import numpy as np

    np.save(maps / "a.npy", np.zeros((4, 4), np.float32))
    p = _write(tmp_path, '{"defects": {"min_area": ' + "9" * 400 + "}}")
    rc = main(["run", "--maps", str(maps), "--config", p, "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 2
    assert "defects.min_area" in capsys.readouterr().err


# --- unsupported features, neutral values, ranges ----------------------------------------

#: Empty: every pyimgano key is implemented (the table is kept for keys to come).
NON_NEUTRAL: dict = {}


@pytest.mark.parametrize(
    "value,error,msg",
    [
        (0.0, ValueError, "pixel_size_mm must be > 0 or null, got 0.0"),
        (-1, ValueError, "pixel_size_mm must be > 0 or null, got -1"),
        ("1", TypeError, "pixel_size_mm must be a number"),
        (float("inf"), ValueError, "pixel_size_mm must be finite"),
    ],
)
def test_pixel_size_mm_checked(value, error, msg):
    with pytest.raises(error, match=msg):
        DefectsConfig(pixel_size_mm=value)


@pytest.mark.parametrize(
    "rules,error,msg",
    [
        ({"name": "a"}, TypeError, "severity_rules must be a list of rules, got dict"),
        ([{"min_area": 3}], ValueError, r"severity_rules\[0\].name must be a non-empty string"),
        ([{"name": "a", "min_size": 3}], ValueError, "unknown condition 'min_size'"),
        ([{"name": "a", "min_area_mm2": 1}], ValueError, "min_area_mm2 needs pixel_size_mm"),
    ],
)
def test_severity_rules_checked(rules, error, msg):
    with pytest.raises(error, match=msg):
        DefectsConfig(severity_rules=rules)


#: The toolbox fields whose stage now runs in DefectHead: any valid value loads.
NOW_SUPPORTED = {
    "mask_space": "full",
    "border_ignore_px": 2,
    "map_smoothing_method": "gaussian",
    "hysteresis_enabled": True,
    "merge_nearby_enabled": True,
    "mask_dilate_ksize": 3,
    "max_regions_sort_by": "area",
    "min_score_max": 0.5,
    "min_score_mean": 0.2,
    "min_fill_ratio": 0.3,
    "max_aspect_ratio": 4.0,
    "min_solidity": 0.5,
    "min_score_max_quantile": 0.5,
    "pixel_size_mm": 0.05,
    "severity_rules": [{"name": "critical", "min_area": 5}],
}


def test_unsupported_table_is_covered():
    assert set(NON_NEUTRAL) == set(UNSUPPORTED_UNTIL_IMPLEMENTED)
    assert not set(NOW_SUPPORTED) & set(UNSUPPORTED_UNTIL_IMPLEMENTED)


@pytest.mark.parametrize("name", sorted(UNSUPPORTED_UNTIL_IMPLEMENTED))
def test_unsupported_accepted_only_at_neutral(name):
    neutral = UNSUPPORTED_UNTIL_IMPLEMENTED[name]
    assert getattr(load_config({"defects": {name: neutral}}), name) == neutral
    assert getattr(DefectsConfig(), name) == neutral  # the default is the neutral value
    with pytest.raises(ConfigError) as e:
        load_config({"per_category": {"b": {"defects": {name: NON_NEUTRAL[name]}}}})
    msg = str(e.value)
    assert msg.startswith(f"per_category.b.defects.{name}=")
    assert "is not supported yet by torchdefects" in msg


@pytest.mark.parametrize("name", sorted(NOW_SUPPORTED))
def test_toolbox_fields_load(name):
    cfg = load_config({"per_category": {"b": {"defects": {name: NOW_SUPPORTED[name]}}}}, "b")
    assert getattr(cfg, name) == NOW_SUPPORTED[name]


def test_severity_config_round_trip(tmp_path):
    rules = [
        {"name": "critical", "min_area_mm2": 0.5, "min_score_max": 0.9},
        {"name": "major", "min_length_mm": 2},
        {"name": "minor"},
    ]
    cfg = DefectsConfig(pixel_threshold=0.5, pixel_size_mm=0.02, severity_rules=rules)
    path = str(tmp_path / "c.json")
    save_config(cfg, path)
    back = load_config(path)
    assert back == cfg and back.severity_rules == rules and back.pixel_size_mm == 0.02
    with open(path, encoding="utf-8") as f:
        assert json.load(f)["defects"]["severity_rules"] == rules


@pytest.mark.parametrize(
    "block,error,msg",
    [
        (
            {"severity_rules": [{"name": "a"}, {"name": "b", "min_area": "x"}]},
            ConfigError,
            r"per_category\.p\.defects\.severity_rules\[1\]\.min_area must be a finite number",
        ),
        (
            {"severity_rules": [{"name": "a", "min_area_mm2": 1}]},
            ConfigError,
            r"per_category\.p\.defects\.severity_rules\[0\]\.min_area_mm2 needs pixel_size_mm",
        ),
        (
            {"pixel_size_mm": 0.1, "severity_rules": [{"name": "a", "max_area": 1}]},
            ConfigError,
            r"per_category\.p\.defects\.severity_rules\[0\] has unknown condition 'max_area'",
        ),
    ],
)
def test_bad_severity_rule_names_its_path(block, error, msg):
    with pytest.raises(error, match=msg):
        load_config({"per_category": {"p": {"defects": block}}}, "p")


def test_toolbox_via_pyimgano_nested_form():
    cfg = load_config({"defects": {"hysteresis": {"enabled": True, "low": 0.1}}})
    assert cfg.hysteresis_enabled is True and cfg.hysteresis_low == 0.1
    cfg = load_config({"defects": {"shape_filters": {"min_solidity": 0.5}}})
    assert cfg.min_solidity == 0.5


@pytest.mark.parametrize(
    "name,value,msg",
    [
        ("pixel_normal_quantile", 0.0, "pixel_normal_quantile must be in (0.0, 1.0], got 0.0"),
        ("pixel_normal_quantile", 1.5, "must be in (0.0, 1.0]"),
        ("pixel_threshold_strategy", "otsu", "pixel_threshold_strategy must be one of"),
        ("mask_space", "image", "mask_space must be one of 'roi', 'full', got 'image'"),
        ("map_smoothing_method", "bilateral", "map_smoothing_method must be one of"),
        ("map_smoothing_ksize", -1, "map_smoothing_ksize must be an integer >= 0"),
        ("map_smoothing_ksize", 1003, "map_smoothing_ksize must be at most 1001"),
        ("map_smoothing_sigma", -0.5, "map_smoothing_sigma must be >= 0.0, got -0.5"),
        ("hysteresis_low", -1.0, "hysteresis_low must be >= 0.0 or null"),
        ("hysteresis_high", "x", "hysteresis_high must be a number or None"),
        ("border_ignore_px", -1, "border_ignore_px must be an integer >= 0"),
        ("mask_dilate_ksize", 2.0, "mask_dilate_ksize must be an integer"),
        ("min_fill_ratio", 1.5, "min_fill_ratio must be in [0.0, 1.0] or null, got 1.5"),
        ("min_solidity", -0.1, "min_solidity must be in [0.0, 1.0] or null"),
        ("max_aspect_ratio", 0.5, "max_aspect_ratio must be >= 1.0 or null, got 0.5"),
        ("min_score_max", -1.0, "min_score_max must be >= 0.0 or null"),
        ("min_score_mean", float("nan"), "min_score_mean must be finite, got nan"),
        ("min_score_max_quantile", 2.0, "min_score_max_quantile must be in [0.0, 1.0]"),
        ("merge_nearby_max_gap_px", -2, "merge_nearby_max_gap_px must be an integer >= 0"),
        ("max_regions_sort_by", "size", "max_regions_sort_by must be one of"),
        ("open_ksize", 1003, "open_ksize must be at most 1001"),
        ("close_ksize", 100000001, "close_ksize must be at most 1001"),
        ("enabled", 1, "enabled must be true or false, got 1"),
    ],
)
def test_new_field_validation(name, value, msg):
    with pytest.raises(ConfigError) as e:
        load_config({"defects": {name: value}})
    assert f"defects.{name}" in str(e.value)
    assert msg in str(e.value)


def test_ksize_cap_accepts_1001():
    assert KSIZE_MAX == 1001
    assert load_config({"defects": {"open_ksize": 1001, "close_ksize": 1001}}).open_ksize == 1001
    with pytest.raises(ValueError, match=r"median smoothing, got 2"):
        DefectsConfig(map_smoothing_ksize=2, map_smoothing_method="median")


# --- provenance ------------------------------------------------------------------------

PYIMGANO_PROVENANCE = [
    {"method": "fixed", "source": "explicit", "value": 0.5},
    {"method": "fixed", "source": "infer_config", "value": 0.5},
    {
        "method": "normal_pixel_quantile",
        "source": "train_dir",
        "q": 0.999,
        "calibration_map_count": 12,
        "calibration_pixel_count": 12 * 40,
        "roi_used": True,
        "roi_xyxy_norm": [0.1, 0.1, 0.9, 0.9],
        "roi_pixel_count": 40,
        "roi_reason": None,
    },
    {
        "method": "normal_pixel_quantile",
        "source": "train_dir",
        "q": 0.99,
        "calibration_map_count": 3,
        "calibration_pixel_count": 300,
        "roi_used": False,
        "roi_xyxy_norm": [0.0, 0.0, 0.0, 0.0],
        "roi_pixel_count": 0,
        "roi_reason": "roi_empty",
    },
]


@pytest.mark.parametrize("prov", PYIMGANO_PROVENANCE)
def test_pyimgano_provenance_read_unchanged(tmp_path, prov):
    jsonschema = pytest.importorskip("jsonschema")
    raw = {
        "schema_version": 1,
        "defects": {"pixel_threshold": 0.5, "pixel_threshold_provenance": prov},
    }
    cfg = load_config(_write(tmp_path, raw))
    assert cfg.pixel_threshold_provenance == prov
    assert upgrade_provenance(prov) == prov
    jsonschema.validate(prov, PROVENANCE_SCHEMA)


def test_provenance_method_checked_for_new_sources():
    with pytest.raises(ConfigError, match=r"pixel_threshold_provenance.method must be one of"):
        load_config(
            {"defects": {"pixel_threshold_provenance": {"source": "train_dir", "method": "x"}}}
        )
    for method in ("supervised_segf1", "image_f1"):  # reserved for supervised thresholds
        prov = {"source": "train_dir", "method": method}
        assert load_config({"defects": {"pixel_threshold_provenance": prov}})


OLD_CALIBRATION = {
    "source": "calibration",
    "method": "normal_pixel_quantile",
    "q": 0.9,
    "calibration_map_count": 4,
    "calibration_pixel_count": 800,
    "roi_xyxy_norm": [0.2, 0.0, 0.8, 0.5],
    "roi_pixel_count": 240,
    "fingerprint": "sha256:00",
    "torchdefects_version": "0.1.0",
    "created_at": "2026-05-09T07:35:25Z",
}


def test_old_vocabulary_converted_on_load(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    raw = {
        "schema_version": 1,
        "defects": {"pixel_threshold": 0.5, "pixel_threshold_provenance": OLD_CALIBRATION},
    }
    prov = load_config(_write(tmp_path, raw)).pixel_threshold_provenance
    assert prov == {
        **{
            k: v
            for k, v in OLD_CALIBRATION.items()
            if k not in ("calibration_pixel_count", "roi_pixel_count")
        },
        "source": "train_dir",
        "calibration_pixel_count": 240,  # the pixels in the quantile (pyimgano's meaning)
        "map_pixel_count": 800,  # every pixel of the maps (the old calibration_pixel_count)
        "roi_pixel_count": None,  # per map: the old record cannot tell
        "roi_used": True,
        "roi_reason": None,
        "upgraded_from": "calibration",
    }
    jsonschema.validate(prov, PROVENANCE_SCHEMA)
    old_config = {"source": "config", "path": "c.json", "stored_provenance": OLD_CALIBRATION}
    up = upgrade_provenance(old_config)
    assert (up["source"], up["method"], up["upgraded_from"]) == ("infer_config", "fixed", "config")
    assert up["stored_provenance"]["source"] == "train_dir"
    assert upgrade_provenance({"source": "explicit"}) == {"source": "explicit", "method": "fixed"}
    assert old_config["source"] == "config"  # not mutated
    # no ROI in the old record
    no_roi = dict(OLD_CALIBRATION, roi_xyxy_norm=None, roi_pixel_count=800)
    assert upgrade_provenance(no_roi)["roi_used"] is False


def test_round_trip_keeps_foreign_keys(tmp_path):
    raw = copy.deepcopy(WORKBENCH_EXPORT)
    raw["per_category"] = {"bottle": {"threshold": 0.3, "defects": {"min_area": 2}}}
    p = str(tmp_path / "infer_config.json")
    save_config(raw, p)
    assert read_config_dict(p) == raw
    cfg = load_config(p)
    # a calibration written in keeps pyimgano's schema_version and every other key
    out = set_pixel_threshold(raw, 0.61, PYIMGANO_PROVENANCE[2], category="bottle")
    save_config(out, p)
    back = read_config_dict(p)
    assert back["schema_version"] == 1 and back["model"] == raw["model"]
    assert back["defects"]["map_smoothing"] == raw["defects"]["map_smoothing"]
    assert back["per_category"]["bottle"]["threshold"] == 0.3
    assert load_config(p).pixel_threshold == 0.61 and cfg.min_area == 2
    # a NaN metric in a pyimgano report does not block writing; it becomes null
    raw["per_category"]["bottle"]["metrics"] = {"pixel_auroc": float("nan")}
    save_config(raw, p)
    assert read_config_dict(p)["per_category"]["bottle"]["metrics"] == {"pixel_auroc": None}
    with pytest.raises(ConfigError, match="not plain JSON"):
        save_config({"model": {1, 2}}, p)


# --- field metadata and docs/config.md ---------------------------------------------------


def test_field_metadata_convention():
    flags = set()
    for f in dataclasses.fields(DefectsConfig):
        if f.name.startswith("_"):
            continue
        meta = f.metadata
        assert isinstance(meta["help"], str) and meta["help"], f.name
        assert set(meta) <= {
            "help",
            "flag",
            "aliases",
            "choices",
            "group",
            "cli",
            "oracle",
            "metavar",
            "nargs",  # with "type": a flag taking one JSON value (severity_rules)
            "type",
        }
        if meta.get("cli", True):
            for flag in (field_flag(f), *meta.get("aliases", ())):
                assert flag.startswith("--") and flag not in flags, flag
                flags.add(flag)
        if "choices" in meta:
            assert f.default in meta["choices"]
    by_name = {f.name: f for f in dataclasses.fields(DefectsConfig)}
    assert field_flag(by_name["connectivity"]) == "--connectivity"
    assert field_flag(by_name["min_area"]) == "--defect-min-area"  # pyimgano's flag
    assert field_flag(by_name["mask_space"]) == "--defects-mask-space"


def test_docs_config_md_is_generated():
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "config.md")
    with open(path, encoding="utf-8") as f:
        committed = f.read()
    assert committed == config_docs_markdown(), (
        "docs/config.md is stale: regenerate it with "
        "python -c 'import torchdefects.config as c; print(c.config_docs_markdown(), end=\"\")' "
        "> docs/config.md"
    )
    for name in DEFECTS_KEYS:
        assert f"| `{name}` |" in committed


def test_workbench_recipe_config_reads():
    # pyimgano's recipe config (examples/configs style): other top-level sections, same block
    recipe = {
        "recipe": "industrial-adapt-fp40",
        "seed": 123,
        "meta": {"purpose": "defects-roi"},
        "dataset": {"name": "mvtec", "category": "bottle", "resize": [256, 256]},
        "model": {"name": "vision_patchcore", "device": "cuda"},
        "adaptation": {"save_maps": True},
        "defects": {
            "enabled": True,
            "pixel_threshold": 0.5,
            "pixel_threshold_strategy": "fixed",
            "mask_format": "png",
            "roi_xyxy_norm": [0.1, 0.1, 0.9, 0.9],
            "min_area": 0,
            "min_score_max": None,
            "min_score_mean": None,
            "open_ksize": 0,
            "close_ksize": 0,
            "fill_holes": False,
            "max_regions": None,
        },
        "output": {"save_run": True, "per_image_jsonl": True},
    }
    cfg = load_config(recipe)
    assert (cfg.pixel_threshold, cfg.roi_xyxy_norm) == (0.5, [0.1, 0.1, 0.9, 0.9])


def test_calibrate_into_a_pyimgano_file_keeps_it(tmp_path):
    import numpy as np

    from torchdefects.cli import main

    maps = tmp_path / "normal"
    maps.mkdir()
    rng = np.random.default_rng(0)
    arrays = [rng.random((8, 10)).astype(np.float32) for _ in range(3)]
    for i, a in enumerate(arrays):
        np.save(maps / f"m{i}.npy", a)
    p = _write(tmp_path, WORKBENCH_EXPORT, "infer_config.json")
    rc = main(["calibrate", "--maps", str(maps), "--q", "0.9", "-o", p, "--quiet"])
    assert rc == 0
    back = read_config_dict(p)
    for key in WORKBENCH_EXPORT:
        if key != "defects":
            assert back[key] == WORKBENCH_EXPORT[key], key
    assert back["defects"]["map_smoothing"] == PYIMGANO_DEFECTS["map_smoothing"]
    prov = back["defects"]["pixel_threshold_provenance"]
    assert (prov["source"], prov["method"], prov["roi_used"]) == (
        "train_dir",
        "normal_pixel_quantile",
        True,
    )
    # the file's ROI [0.1, 0.1, 0.9, 0.9] on 8 x 10 maps: rows 0..7, columns 1..8
    assert prov["roi_pixel_count"] == 8 * 8 and prov["calibration_pixel_count"] == 3 * 64
    roi_pixels = np.concatenate([a[0:8, 1:9].ravel() for a in arrays]).astype(np.float64)
    assert back["defects"]["pixel_threshold"] == float(np.quantile(roi_pixels, 0.9))
