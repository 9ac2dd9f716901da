import json

import numpy as np
import pytest
import torch

from torchdefects import connected_components, region_stats
from torchdefects.config import DefectsConfig
from torchdefects.head import DefectHead
from torchdefects.severity import (
    SEVERITY_KEYS,
    parse_severity_rules,
    region_units,
    severity_classes,
    severity_features,
)
from torchdefects.shape import shape_stats

RULES = [
    {"name": "critical", "min_area_mm2": 0.5},
    {"name": "major", "min_score_max": 0.9, "min_area": 3},
    {"name": "minor", "min_score_max": 0.7},
]


def setup(seed=0):
    rng = np.random.default_rng(seed)
    m = torch.from_numpy(rng.random((4, 20, 25)) < 0.3)
    amap = torch.from_numpy(rng.random((4, 20, 25)).astype(np.float32))
    labels, counts = connected_components(m, 8)
    return region_stats(labels, counts, amap)


def test_units_by_hand():
    regions = setup()
    u = region_units(regions, 0.05, (2.0, 3.0))
    mx, my = 0.1, 0.15
    for i in range(regions.area.shape[0]):
        x1, y1, x2, y2 = regions.bbox_xyxy[i].tolist()
        assert float(u.area_mm2[i]) == pytest.approx(int(regions.area[i]) * mx * my, rel=1e-15)
        np.testing.assert_allclose(
            u.bbox_xyxy_mm[i].numpy(), [x1 * mx, y1 * my, (x2 + 1) * mx, (y2 + 1) * my], rtol=1e-15
        )
        cx, cy = regions.centroid_xy[i].tolist()
        np.testing.assert_allclose(
            u.centroid_xy_mm[i].numpy(), [(cx + 0.5) * mx, (cy + 0.5) * my], rtol=1e-15
        )
        assert float(u.length_mm[i]) == pytest.approx(
            max((x2 - x1 + 1) * mx, (y2 - y1 + 1) * my), rel=1e-15
        )
    with pytest.raises(ValueError, match="pixel_size_mm must be a finite number > 0"):
        region_units(regions, 0.0)
    with pytest.raises(ValueError, match=r"map_to_image\[1\] must be a finite number > 0"):
        region_units(regions, 0.1, (1.0, -2.0))


def oracle_classes(feat_rows, rules):
    out = []
    for f in feat_rows:
        cls = -1
        for i, rule in enumerate(rules):
            if all(f[SEVERITY_KEYS.index(k)] >= v for k, v in rule.items() if k != "name"):
                cls = i
                break
        out.append(cls)
    return out


def test_classes_against_python_rules(device):
    regions = setup(1)
    u = region_units(regions, 0.2)
    feats = severity_features(regions, u.area_mm2, u.length_mm, shape_stats(regions).aspect_ratio)
    rules = parse_severity_rules(RULES)
    rc, ic = severity_classes(
        feats.to(device), rules.thresholds, rules.active, regions.batch_index.to(device), 5
    )
    exp = oracle_classes(feats.tolist(), RULES)
    assert rc.cpu().tolist() == exp
    for b in range(5):
        cls = [c for c, bi in zip(exp, regions.batch_index.tolist()) if bi == b and c >= 0]
        assert int(ic[b]) == (min(cls) if cls else -1)
    scripted = torch.jit.script(severity_classes)
    a = scripted(feats, rules.thresholds, rules.active, regions.batch_index, 5)
    b = severity_classes(feats, rules.thresholds, rules.active, regions.batch_index, 5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_missing_features_never_match_and_empty():
    regions = setup(2)
    feats = severity_features(regions)  # no mm columns: NaN
    rules = parse_severity_rules([{"name": "critical", "min_area_mm2": 0.0}, {"name": "rest"}])
    rc, ic = severity_classes(feats, rules.thresholds, rules.active, regions.batch_index, 4)
    assert (rc == 1).all()
    none = parse_severity_rules([])
    rc, ic = severity_classes(feats, none.thresholds, none.active, regions.batch_index, 4)
    assert (rc == -1).all() and (ic == -1).all()
    rc, ic = severity_classes(feats[:0], rules.thresholds, rules.active, regions.batch_index[:0], 2)
    assert rc.shape == (0,) and ic.tolist() == [-1, -1]


def test_rule_errors():
    with pytest.raises(TypeError, match="severity_rules must be a list"):
        parse_severity_rules({"name": "x"})
    with pytest.raises(TypeError, match=r"severity_rules\[0\] must be a dict"):
        parse_severity_rules(["x"])
    with pytest.raises(ValueError, match=r"severity_rules\[0\].name must be a non-empty string"):
        parse_severity_rules([{"min_area": 3}])
    with pytest.raises(ValueError, match="is used by an earlier rule"):
        parse_severity_rules([{"name": "a"}, {"name": "a"}])
    with pytest.raises(ValueError, match="unknown condition 'min_aera'"):
        parse_severity_rules([{"name": "a", "min_aera": 3}])
    with pytest.raises(ValueError, match=r"severity_rules\[0\].min_area must be a finite number"):
        parse_severity_rules([{"name": "a", "min_area": float("nan")}])
    with pytest.raises(ValueError, match="needs pixel_size_mm"):
        parse_severity_rules([{"name": "a", "min_area_mm2": 1.0}], has_units=False)


# ----------------------------------------------------------------------------------------
# DefectHead: severity per region and image, against a plain-Python evaluation of the rules
# ----------------------------------------------------------------------------------------

PIXEL_MM = 0.05
HEAD_RULES = [
    {"name": "critical", "min_area_mm2": 1.0, "min_score_max": 0.9},
    {"name": "hot", "min_score_mean": 0.74},
    {"name": "long", "min_length_mm": 1.0},
    {"name": "elongated", "min_aspect_ratio": 1.6},
    {"name": "big", "min_area": 50},
    {"name": "minor", "min_score_max": 0.8},
]
# Original-image pixels per map pixel, per image: (sx, sy).
SCALES = [(1.0, 1.0), (2.0, 3.0), (0.5, 0.25), (4.0, 4.0), (1.5, 0.75), (3.0, 1.0), (1.0, 2.0),
          (2.0, 1.0), (0.5, 0.5), (1.0, 1.0)]  # fmt: skip
N_MAPS = len(SCALES)


def head_maps():
    """Realistic maps plus adversarial ones: NaN pixels, full, empty, 1-pixel lines."""
    from tests.test_head import realistic_maps

    x = torch.from_numpy(realistic_maps(N_MAPS, 30, 41, seed=3))[:, None]
    x[1, 0, 4:8, 4:8] = float("nan")
    x[5, 0, :, 7] = 0.95  # a full-height line, 1 px wide
    x[5, 0, 20, :] = 0.66
    x[8] = 0.9  # full: one region of the whole map
    x[9] = 0.0  # empty: no region, image class -1
    return x


def head_config(**kw):
    base = dict(pixel_threshold=0.5, pixel_size_mm=PIXEL_MM, severity_rules=HEAD_RULES)
    base.update(kw)
    return DefectsConfig(**base)


def oracle_severity(x, out, scales, pixel_mm, rules):
    """Each reported region's stats recomputed with NumPy from the label map, then the
    rules evaluated in plain Python: the first rule all of whose conditions hold."""
    labels = out.labels[:, 0].cpu().numpy()
    maps = x[:, 0].cpu().numpy()
    rows = []
    for b, lab in zip(out.regions.batch_index.tolist(), out.regions.label.tolist()):
        ys, xs = np.nonzero(labels[b] == lab)
        vals = maps[b][ys, xs]
        w = int(xs.max() - xs.min() + 1)
        h = int(ys.max() - ys.min() + 1)
        sx, sy = scales[b]
        mx, my = pixel_mm * sx, pixel_mm * sy
        feats = {
            "min_area": ys.size,
            "min_score_max": float(vals.max()),
            "min_score_mean": float(np.float32(vals.astype(np.float64).mean())),
            "min_area_mm2": ys.size * pixel_mm**2 * sx * sy,
            "min_length_mm": max(w * mx, h * my),
            "min_aspect_ratio": max(w / h, h / w),
        }
        cls = -1
        for i, rule in enumerate(rules):
            if all(feats[k] >= v for k, v in rule.items() if k != "name"):
                cls = i
                break
        rows.append((b, cls))
    region = [c for _, c in rows]
    image = []
    for b in range(x.shape[0]):
        got = [c for bb, c in rows if bb == b and c >= 0]
        image.append(min(got) if got else -1)
    return region, image


def test_head_severity_against_python_rules(device):
    x = head_maps().to(device)
    scales = torch.tensor(SCALES, dtype=torch.float64)
    head = DefectHead(head_config()).to(device)
    out = head(x, map_to_image=scales.to(device))
    region, image = oracle_severity(x, out, SCALES, PIXEL_MM, HEAD_RULES)
    assert out.severity.dtype == torch.int64 and out.image_severity.dtype == torch.int64
    assert out.severity.cpu().tolist() == region
    assert out.image_severity.cpu().tolist() == image
    # the test exercises most rules, "no rule" included, and the empty image
    assert set(region) == set(range(-1, len(HEAD_RULES))) and image[9] == -1
    # batch == per image (each with its own scale; given as (2,) and as a tuple)
    for b in range(x.shape[0]):
        one = head(x[b : b + 1], map_to_image=scales[b])
        rows = out.regions.batch_index == b
        assert torch.equal(one.severity, out.severity[rows])
        assert torch.equal(one.image_severity, out.image_severity[b : b + 1])
        two = head(x[b : b + 1], map_to_image=SCALES[b])
        assert torch.equal(two.severity, one.severity)
    # scripted == eager
    scripted = torch.jit.script(head)
    s = scripted(x, None, None, scales.to(device))
    assert torch.equal(s.severity, out.severity)
    assert torch.equal(s.image_severity, out.image_severity)


def test_head_default_scale_and_no_rules(device):
    x = head_maps().to(device)
    head = DefectHead(head_config()).to(device)
    out = head(x)  # default: a map pixel is an image pixel
    region, image = oracle_severity(x, out, [(1.0, 1.0)] * N_MAPS, PIXEL_MM, HEAD_RULES)
    assert out.severity.cpu().tolist() == region and out.image_severity.cpu().tolist() == image
    assert torch.equal(head(x, map_to_image=(1, 1)).severity, out.severity)
    # without units: mm rules are refused by the config, the others still apply
    rules = [r for r in HEAD_RULES if not ({"min_area_mm2", "min_length_mm"} & set(r))]
    plain = DefectHead(head_config(pixel_size_mm=None, severity_rules=rules)).to(device)
    p = plain(x)
    assert p.severity.cpu().tolist() == oracle_severity(x, p, [(1.0, 1.0)] * N_MAPS, 1.0, rules)[0]
    # no rules: None in Defects, and nothing else changes
    none = DefectHead(head_config(severity_rules=None)).to(device)(x)
    assert none.severity is None and none.image_severity is None
    assert torch.equal(none.labels, out.labels) and torch.equal(none.num_regions, out.num_regions)


def test_head_map_to_image_errors():
    head = DefectHead(head_config())
    x = head_maps()
    with pytest.raises(ValueError, match=r"map_to_image must have shape \[2\] or \[10, 2\], got"):
        head(x, map_to_image=torch.ones(3, 2))
    with pytest.raises(ValueError, match="map_to_image must be finite and > 0"):
        head(x, map_to_image=(1.0, 0.0))
    with pytest.raises(ValueError, match="map_to_image must be finite and > 0"):
        head(x, map_to_image=torch.tensor([1.0, float("nan")]))
    with pytest.raises(TypeError, match="map_to_image must be"):
        head(x, map_to_image="2x")
    with pytest.raises(TypeError, match="map_to_image must be"):
        head(x, map_to_image=(1.0, 2.0, 3.0))


def test_severity_config_is_not_mutable_through_the_head():
    rules = [dict(r) for r in HEAD_RULES]
    head = DefectHead(head_config(severity_rules=rules))
    rules[0]["min_score_max"] = 0.0  # the caller's list changes later
    col = head.severity_columns.index(SEVERITY_KEYS.index("min_score_max"))
    assert head.severity_columns == list(range(len(SEVERITY_KEYS)))  # every key is used
    assert head.severity_thresholds[0, col] == 0.9
    assert head.severity_names == [r["name"] for r in HEAD_RULES]
    # .half() and .to() keep the rules in float64
    assert head.half().severity_thresholds.dtype == torch.float64


def test_static_severity_equals_dynamic(device):
    x = head_maps().to(device)
    scales = torch.tensor(SCALES, dtype=torch.float64, device=device)
    cfg = head_config(max_regions=3)
    flat = DefectHead(cfg).to(device)(x, map_to_image=scales)
    head = DefectHead(cfg, static_output=True).to(device)
    out = head(x, map_to_image=scales)
    assert out.severity.shape == (N_MAPS, 3) and out.image_severity.shape == (N_MAPS,)
    k = 0
    for b, n in enumerate(flat.num_regions.tolist()):
        assert out.severity[b, :n].tolist() == flat.severity[k : k + n].tolist()
        assert (out.severity[b, n:] == -1).all()  # padding is -1, never class 0
        k += n
    assert torch.equal(out.image_severity, flat.image_severity)
    # the traced forward (torch.export / ONNX) computes it from the padded rows
    traced = head._forward_static(x, None, None, scales)
    assert torch.equal(traced.severity, out.severity)
    assert torch.equal(traced.image_severity, out.image_severity)
    scripted = torch.jit.script(head)(x, None, None, scales)
    assert torch.equal(scripted.severity, out.severity)
    # without rules: all -1, same shapes
    plain = DefectHead(head_config(severity_rules=None, max_regions=3), static_output=True)
    p = plain.to(device)(x)
    assert (p.severity == -1).all() and p.severity.shape == (N_MAPS, 3)
    assert (p.image_severity == -1).all()
    assert (plain._forward_static(x).severity == -1).all()


def test_export_pt2_severity_equals_eager(tmp_path):
    from tests.test_export import assert_static_equal
    from torchdefects.export import export_pt2, load_pt2

    head = DefectHead(head_config(max_regions=4), static_output=True)
    x = head_maps()
    path = tmp_path / "head.pt2"
    export_pt2(head, path, x[:2])
    module, _ = load_pt2(path)
    want = head(x)  # exported graphs take the default scale (1, 1)
    assert (want.severity >= 0).sum() > 5
    assert_static_equal(module(x), want)


@pytest.mark.slow
def test_export_onnx_severity_equals_eager(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from tests.test_export import assert_static_equal
    from torchdefects.export import export_onnx

    head = DefectHead(head_config(max_regions=4), static_output=True)
    path = tmp_path / "head.onnx"
    x = head_maps()
    export_onnx(head, path, x[:2])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert names[-2:] == ["severity", "image_severity"]
    outs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    got = {n: torch.from_numpy(o) for n, o in zip(names, outs)}
    assert_static_equal(got, head(x), uint8_mask=True)


# ----------------------------------------------------------------------------------------
# Units through the image space, records and extract_defects
# ----------------------------------------------------------------------------------------


def test_units_origin_matches_image_space():
    from torchdefects.geometry import ImageSpace

    regions = setup(4)
    for space in (
        ImageSpace.make((20, 25), (60, 100), center_crop=False),
        ImageSpace.make((20, 25), (90, 130), center_crop=True, input_size=(40, 50)),
    ):
        scale, origin = space.affine_xy()
        u = region_units(regions, 0.1, scale, origin)
        for i, (x1, y1, x2, y2) in enumerate(regions.bbox_xyxy.tolist()):
            # oracle: the image space's own map -> image coordinate transform, in mm
            want = [
                space._x_to_image(x1, 1),
                space._x_to_image(y1, 0),
                space._x_to_image(x2 + 1, 1),
                space._x_to_image(y2 + 1, 0),
            ]
            np.testing.assert_allclose(u.bbox_xyxy_mm[i].numpy(), np.array(want) * 0.1, rtol=1e-12)
            ib = space.bbox_to_image([x1, y1, x2, y2])  # the inclusive image box covers it
            lo = u.bbox_xyxy_mm[i].numpy() / 0.1
            assert ib[0] <= lo[0] + 1e-9 and ib[2] + 1 >= lo[2] - 1e-9
        area_px = regions.area.to(torch.float64) * scale[0] * scale[1]
        torch.testing.assert_close(u.area_mm2, area_px * 0.01, rtol=1e-12, atol=0)


def test_run_records_units_and_severity_with_resized_maps(tmp_path):
    """``run`` on maps smaller than their images: area_mm2 = area * pixel_size_mm**2 * sx *
    sy with sx, sy from the sizes, severity by name, as the head decides with that scale."""
    jsonschema = pytest.importorskip("jsonschema")
    from torchdefects.batch import records
    from torchdefects.cli import main

    x = head_maps()[:, 0].nan_to_num().numpy()  # run records NaN maps as errors
    maps = tmp_path / "maps"
    maps.mkdir()
    for i in range(x.shape[0]):
        np.save(maps / f"m{i}.npy", x[i])
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps(HEAD_RULES))
    out = tmp_path / "out"
    img_h, img_w = 75, 164  # map 30 x 41: sx = 4, sy = 2.5
    rc = main(
        ["run", "--maps", str(maps), "--out", str(out), "--pixel-threshold", "0.5",
         "--image-size", str(img_h), str(img_w), "--defect-pixel-size-mm", str(PIXEL_MM),
         "--defect-severity-rules", f"@{rules}", "--quiet"]
    )  # fmt: skip
    assert rc == 0
    recs = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    validator = jsonschema.Draft202012Validator(records.record_schema())
    sx, sy = img_w / 41, img_h / 30
    head = DefectHead(head_config())
    want = head(torch.from_numpy(x)[:, None], map_to_image=(sx, sy))
    # the scale matters here: at (1, 1) the mm rules give other classes
    assert not torch.equal(head(torch.from_numpy(x)[:, None]).severity, want.severity)
    names = [r["name"] for r in HEAD_RULES]
    k = 0
    seen = set()
    for b, rec in enumerate(sorted(recs, key=lambda r: r["index"])):
        validator.validate(rec)
        d = rec["defects"]
        assert d["units"] == {
            "pixel_size_mm": PIXEL_MM,
            "map_pixel_mm_xy": [PIXEL_MM * sx, PIXEL_MM * sy],
        }
        iw = int(want.image_severity[b])
        assert d["severity"] == (names[iw] if iw >= 0 else None)
        for reg in d["regions"]:
            assert reg["area_mm2"] == pytest.approx(reg["area"] * PIXEL_MM**2 * sx * sy, rel=1e-12)
            x1, y1, x2, y2 = reg["bbox_xyxy"]
            np.testing.assert_allclose(
                reg["bbox_xyxy_mm"],
                [x1 * sx * PIXEL_MM, y1 * sy * PIXEL_MM, (x2 + 1) * sx * PIXEL_MM,
                 (y2 + 1) * sy * PIXEL_MM],
                rtol=1e-12,
            )  # fmt: skip
            c = int(want.severity[k])
            assert reg["severity"] == (names[c] if c >= 0 else None)
            seen.add(reg["severity"])
            k += 1
    assert len(seen) >= 4 and None in seen
    # a region line validates too
    line = records.region_line(recs[0], recs[0]["defects"]["regions"][0])
    jsonschema.Draft202012Validator(
        {**records.record_schema(), "oneOf": [{"$ref": "#/$defs/region_line"}]}
    ).validate(line)


def test_cli_severity_rules_flag(tmp_path, capsys):
    from torchdefects.cli import main

    try:
        main(["run", "--help"])
    except SystemExit:
        pass
    text = capsys.readouterr().out
    assert "--defect-severity-rules" in text and "--defect-pixel-size-mm" in text
    maps = tmp_path / "maps"
    maps.mkdir()
    np.save(maps / "a.npy", np.zeros((4, 4), np.float32))
    base = ["run", "--maps", str(maps), "--pixel-threshold", "0.5", "--quiet"]
    try:
        rc = main(base + ["--out", str(tmp_path / "o1"), "--defect-severity-rules", "{bad"])
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    assert "must be a JSON list of rules" in capsys.readouterr().err
    rc = main(
        base + ["--out", str(tmp_path / "o2"), "--defect-severity-rules", '[{"name": "a", "x": 1}]']
    )
    assert rc == 2
    assert "severity_rules[0] has unknown condition 'x'" in capsys.readouterr().err
    rc = main(base + ["--out", str(tmp_path / "o3"), "--defect-severity-rules", '[{"name": "a"}]'])
    assert rc == 0
    rec = json.loads((tmp_path / "o3" / "results.jsonl").read_text())
    assert rec["defects"]["severity"] is None and "units" not in rec["defects"]


def test_extract_defects_units_and_severity():
    from torchdefects import extract_defects

    x = head_maps()
    for b in (0, 4, 5):
        m = x[b, 0].numpy()
        got = extract_defects(
            m, pixel_threshold=0.5, pixel_size_mm=PIXEL_MM, severity_rules=HEAD_RULES,
            map_to_image=SCALES[b],
        )  # fmt: skip
        out = DefectHead(head_config())(x[b : b + 1], map_to_image=SCALES[b])
        region, image = oracle_severity(x[b : b + 1], out, [SCALES[b]], PIXEL_MM, HEAD_RULES)
        names = [r["name"] for r in HEAD_RULES]
        assert [r["severity"] for r in got["regions"]] == [
            names[c] if c >= 0 else None for c in region
        ]
        assert got["severity"] == (names[image[0]] if image[0] >= 0 else None)
        sx, sy = SCALES[b]
        for r in got["regions"]:
            assert r["area_mm2"] == pytest.approx(r["area"] * PIXEL_MM**2 * sx * sy, rel=1e-12)
    plain = extract_defects(x[0, 0].numpy(), pixel_threshold=0.5)
    assert "severity" not in plain and "area_mm2" not in plain["regions"][0]


def test_overlay_names_severity(tmp_path):
    from torchdefects.overlay import render_overlay, render_record

    m = np.zeros((32, 32), np.float32)
    m[4:10, 4:12] = 0.9
    m[20:24, 20:30] = 0.7
    boxes = [[4, 4, 11, 9], [20, 20, 29, 23]]
    kw = dict(anomaly_map=m, mask=m > 0.5, boxes_xyxy=boxes, scores=[0.9, 0.7], areas=[48, 40])
    plain = render_overlay(threshold=0.5, **kw)
    named = render_overlay(
        threshold=0.5, severities=["critical", None], image_severity="critical", **kw
    )
    # the tags grow by the names (same places, wider boxes)
    wa = [t["xyxy"][2] - t["xyxy"][0] for t in plain.info["torchdefects.layout"]["tags"]]
    wb = [t["xyxy"][2] - t["xyxy"][0] for t in named.info["torchdefects.layout"]["tags"]]
    assert wb[0] > wa[0] and wb[1] > wa[1]
    with pytest.raises(ValueError, match=r"severities must have one entry per box \(2\), got 1"):
        render_overlay(threshold=0.5, severities=["a"], **kw)
    rec = {
        "input": "a.npy",
        "anomaly_map": {"shape": [32, 32]},
        "defects": {
            "pixel_threshold": 0.5,
            "severity": "critical",
            "regions": [
                {"id": 1, "bbox_xyxy": boxes[0], "area": 48, "score_max": 0.9},
                {"id": 2, "bbox_xyxy": boxes[1], "area": 40, "score_max": 0.7},
            ],
        },
    }
    rec["defects"]["regions"][0]["severity"] = "critical"
    rec["defects"]["regions"][1]["severity"] = None
    pic = render_record(rec, anomaly_map=m, mask=m > 0.5)
    named = render_overlay(
        threshold=0.5, severities=["critical", None], image_severity="critical", title="a.npy",
        **kw,
    )  # fmt: skip
    assert np.array_equal(np.asarray(pic), np.asarray(named))  # the same picture


def test_rules_without_conditions_and_unused_columns():
    """A rule with no condition holds for every region (the head then computes no feature
    column); a head computes only the columns its rules test."""
    x = head_maps()
    cfg = head_config(severity_rules=[{"name": "any"}], max_regions=3)
    head = DefectHead(cfg)
    assert head.severity_columns == []
    out = head(x)
    assert (out.severity == 0).all() and out.severity.shape[0] > 0
    want = [0 if n else -1 for n in out.num_regions.tolist()]
    assert out.image_severity.tolist() == want
    assert torch.equal(torch.jit.script(head)(x).severity, out.severity)
    static = DefectHead(cfg, static_output=True)
    assert torch.equal(static._forward_static(x).severity, static(x).severity)
    assert torch.equal(torch.jit.script(static)(x).image_severity, out.image_severity)
    two = DefectHead(head_config(severity_rules=[{"name": "big", "min_area": 9}, {"name": "x"}]))
    assert two.severity_columns == [SEVERITY_KEYS.index("min_area")]
    assert two.severity_thresholds.tolist() == [[9.0], [0.0]]
