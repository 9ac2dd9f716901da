"""torchdefects.batch.records: each record kind against the JSON Schema and its oracles."""

import json
import math

import numpy as np
import pytest

from torchdefects.batch import records


def _validator(kind=None):
    jsonschema = pytest.importorskip("jsonschema")
    schema = records.record_schema()
    if kind is not None:
        schema = {**schema, "oneOf": [{"$ref": f"#/$defs/{kind}"}]}
    return jsonschema.Draft202012Validator(schema)


def test_f32_is_the_shortest_text_of_the_same_float32():
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [
            rng.random(2000).astype(np.float32),
            (rng.standard_normal(2000) * 1e6).astype(np.float32),
            np.float32([0.9, 0.1, 1e-8, 3.4e38, -0.0, 1.0, 2**-140, 16777217]),
        ]
    )
    for v in values:
        got = records.f32(float(v))
        # Oracle: NumPy's repr of a float32 is the shortest round-tripping text.
        assert got == float(str(v))
        assert np.float32(got) == v  # reads back to the same float32
        assert json.loads(json.dumps(got)) == got
    assert records.f32(0.8999999761581421) == 0.9
    assert records.f32(None) is None and records.f32(float("nan")) is None
    assert records.f32(math.inf) is None


@pytest.mark.parametrize(
    "score,label,thr,want",
    [
        (0.4, 1, None, (0.4, 1)),  # the head's label (Defects.image_label) passes through
        (0.4, 0, 0.3, (0.4, 0)),  # ... even with a threshold: the head applied it
        (0.4, None, 0.5, (0.4, 0)),  # no defects: the image threshold decides
        (0.5, None, 0.5, (0.5, 1)),
        (None, None, 0.5, (None, 0)),  # empty ROI: no score, not defective
        (0.4, None, None, (0.4, None)),  # no defects, no threshold: no label
        (0.8999999761581421, 1, None, (0.9, 1)),  # float32-shortest text
    ],
)
def test_image_score_label(score, label, thr, want):
    assert records.image_score_label(score, label, thr) == want


def test_error_records_and_transient_kinds():
    v = _validator()
    for etype in records.ERROR_TYPES:
        rec = records.error_record(4, "x.npy", etype, "why")
        v.validate(rec)
        assert rec["error"]["transient"] is (etype in records.TRANSIENT_ERROR_TYPES)
    assert records.TRANSIENT_ERROR_TYPES == ("out_of_memory",)
    jsonschema = pytest.importorskip("jsonschema")
    with pytest.raises(jsonschema.ValidationError):
        v.validate({"index": 0, "input": "x", "error": {"type": "nope", "message": "",
                                                        "transient": False}})  # fmt: skip


def test_result_record_with_and_without_defects():
    v = _validator()
    cols = {"label": [1, 2], "bbox_xyxy": [[0, 0, 1, 1], [2, 2, 3, 3]], "area": [4, 4],
            "centroid_xy": [[0.5, 0.5], [2.5, 2.5]], "score_max": [0.9, 0.8],
            "score_mean": [0.7, 0.6]}  # fmt: skip
    common = dict(index=1, path="a.npy", map_shape=(4, 4), image_size=None, space=None,
                  threshold=0.5, provenance={"source": "explicit"}, roi_max=0.9,
                  roi_mean=0.3, start=1, count=1, image_threshold=None)  # fmt: skip
    rec = records.result_record(cols=cols, label=1, **common)  # the head's label
    v.validate(rec)
    assert rec["defects"]["regions"] == [
        {"id": 2, "bbox_xyxy": [2, 2, 3, 3], "area": 4, "centroid_xy": [2.5, 2.5],
         "score_max": 0.8, "score_mean": 0.6, "bbox_area": 4, "fill_ratio": 1.0,
         "aspect_ratio": 1.0, "solidity": None}
    ]  # fmt: skip
    assert rec["label"] == 1 and rec["score"] == 0.9
    rec["defects"]["mask"] = records.mask_block("masks/a.png", (4, 4), "png_0_255", "anomaly_map")
    v.validate(rec)
    assert rec["defects"]["mask"]["dtype"] == "uint8"
    off = records.result_record(cols=None, **common)
    v.validate(off)
    assert "defects" not in off and off["label"] is None and off["score"] == 0.9
    line = records.region_line(rec, rec["defects"]["regions"][0])
    _validator("region_line").validate(line)
    assert records.dumps({"a": float("nan")}) == '{"a":null}'


def test_units_columns_and_severity_by_name():
    """units_columns: per input, mm geometry at that input's scale and crop origin (oracle:
    the image space's own map -> image transform); severity indices become rule names."""
    import torch

    from torchdefects import connected_components, region_stats
    from torchdefects.geometry import ImageSpace

    rng = np.random.default_rng(5)
    mask = torch.from_numpy(rng.random((3, 12, 16)) < 0.3)
    labels, counts = connected_components(mask, 8)
    regions = region_stats(labels, counts, torch.rand(3, 12, 16))
    n = torch.bincount(regions.batch_index, minlength=3).tolist()
    spaces = [
        None,
        ImageSpace.make((12, 16), (48, 32), center_crop=False),
        ImageSpace.make((12, 16), (100, 90), center_crop=True, input_size=(24, 32)),
    ]
    cols, blocks = records.units_columns(regions, n, spaces, 0.02)
    assert blocks[0] == {"pixel_size_mm": 0.02, "map_pixel_mm_xy": [0.02, 0.02]}
    assert blocks[1]["map_pixel_mm_xy"] == [0.02 * 2.0, 0.02 * 4.0]
    k = 0
    for b, space in enumerate(spaces):
        for _ in range(n[b]):
            x1, y1, x2, y2 = regions.bbox_xyxy[k].tolist()
            if space is None:
                edges = [x1, y1, x2 + 1, y2 + 1]
                sx = sy = 1.0
            else:
                edges = [space._x_to_image(x1, 1), space._x_to_image(y1, 0),
                         space._x_to_image(x2 + 1, 1), space._x_to_image(y2 + 1, 0)]  # fmt: skip
                sx = (edges[2] - edges[0]) / (x2 + 1 - x1)
                sy = (edges[3] - edges[1]) / (y2 + 1 - y1)
            np.testing.assert_allclose(cols["bbox_xyxy_mm"][k], np.array(edges) * 0.02, rtol=1e-12)
            area = int(regions.area[k])
            assert cols["area_mm2"][k] == pytest.approx(area * 0.02**2 * sx * sy, rel=1e-12)
            k += 1
    assert k == len(cols["area_mm2"])
    # a record with units and severity validates; indices are written as names
    cols.update(
        label=regions.label.tolist()[: n[0]],
        bbox_xyxy=regions.bbox_xyxy.tolist()[: n[0]],
        area=regions.area.tolist()[: n[0]],
        centroid_xy=regions.centroid_xy.tolist()[: n[0]],
        score_max=regions.score_max.tolist()[: n[0]],
        score_mean=regions.score_mean.tolist()[: n[0]],
        severity=[(-1 if i % 3 == 0 else i % 2) for i in range(n[0])],
    )
    rec = records.result_record(
        index=0, path="a.npy", map_shape=(12, 16), image_size=None, space=None,
        threshold=0.5, provenance={"source": "explicit"}, roi_max=0.9, roi_mean=0.1,
        cols=cols, start=0, count=n[0], image_threshold=None, label=1,
        severity_names=["critical", "minor"], image_severity=0, units=blocks[0],
    )  # fmt: skip
    _validator("result").validate(rec)
    got = [r["severity"] for r in rec["defects"]["regions"]]
    assert got == [None if i % 3 == 0 else ["critical", "minor"][i % 2] for i in range(n[0])]
    assert rec["defects"]["severity"] == "critical" and rec["defects"]["units"] == blocks[0]
    rec = records.result_record(
        index=0, path="a.npy", map_shape=(12, 16), image_size=None, space=None,
        threshold=0.5, provenance={"source": "explicit"}, roi_max=0.9, roi_mean=0.1,
        cols=cols, start=0, count=0, image_threshold=None, label=0,
        severity_names=["critical"], image_severity=-1,
    )  # fmt: skip
    assert rec["defects"]["severity"] is None and "units" not in rec["defects"]
