import math

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from tests._shapes import adversarial_masks
from torchdefects import DefectHead, DefectsConfig
from torchdefects.extract import extract_defects

# pyimgano's extract_defects_from_anomaly_map layout.
TOP_KEYS = {"space", "pixel_threshold", "mask", "regions", "map_stats_roi"}
REGION_KEYS = {
    "id",
    "bbox_xyxy",
    "area",
    "centroid_xy",
    "score_max",
    "score_mean",
    "bbox_area",
    "fill_ratio",
    "aspect_ratio",
}


def _scipy_regions(amap, thr, connectivity=8):
    """Oracle written from the definitions: SciPy labels of map >= thr, stats by ndimage."""
    fg = amap >= thr  # NaN compares False
    structure = np.ones((3, 3), bool) if connectivity == 8 else None
    labels, n = ndi.label(fg, structure=structure)
    out = {}
    for lab in range(1, n + 1):
        ys, xs = np.nonzero(labels == lab)
        vals = amap[labels == lab].astype(np.float64)
        out[lab] = {
            "area": len(xs),
            "bbox_xyxy": [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())],
            "centroid_xy": [float(xs.mean()), float(ys.mean())],
            "score_max": float(vals.max()),
            "score_mean": float(vals.mean()),
        }
    return labels, out


def _maps():
    rng = np.random.default_rng(3)
    for name, mask in adversarial_masks():
        amap = np.where(mask, 0.5 + 0.5 * rng.random(mask.shape), 0.4 * rng.random(mask.shape))
        yield name, amap.astype(np.float32)


@pytest.mark.parametrize("name,amap", list(_maps()), ids=[n for n, _ in _maps()])
@pytest.mark.parametrize("connectivity", [4, 8])
def test_equals_scipy_oracle(name, amap, connectivity):
    out = extract_defects(amap, pixel_threshold=0.5, connectivity=connectivity)
    assert set(out) == TOP_KEYS
    assert out["space"] == {"type": "anomaly_map", "shape": list(amap.shape)}
    assert out["pixel_threshold"] == 0.5
    labels, want = _scipy_regions(amap, 0.5, connectivity)
    assert out["mask"].dtype == np.uint8 and out["mask"].shape == amap.shape
    np.testing.assert_array_equal(out["mask"], np.where(labels > 0, 255, 0).astype(np.uint8))
    got = {r["id"]: r for r in out["regions"]}
    assert set(got) == set(want)  # ids are SciPy's raster labels
    for lab, w in want.items():
        r = got[lab]
        assert set(r) == REGION_KEYS
        assert (r["area"], r["bbox_xyxy"]) == (w["area"], w["bbox_xyxy"])
        assert r["centroid_xy"] == pytest.approx(w["centroid_xy"], rel=0, abs=1e-9)
        assert r["score_max"] == w["score_max"]  # float32 max, exactly
        assert r["score_mean"] == pytest.approx(w["score_mean"], rel=1e-6)
        x1, y1, x2, y2 = r["bbox_xyxy"]
        bw, bh = x2 - x1 + 1, y2 - y1 + 1
        assert r["bbox_area"] == bw * bh and r["fill_ratio"] == r["area"] / (bw * bh)
        assert r["aspect_ratio"] == max(bw / bh, bh / bw)
    # the head's order: score_max desc, area desc, id asc
    keys = [(-r["score_max"], -r["area"], r["id"]) for r in out["regions"]]
    assert keys == sorted(keys)
    assert out["map_stats_roi"]["max"] == float(amap.max())
    assert out["map_stats_roi"]["mean"] == pytest.approx(float(amap.astype(np.float64).mean()))


CONFIGS = [
    {},
    {"roi_xyxy_norm": [0.1, 0.2, 0.8, 0.9]},
    {"open_ksize": 3},
    {"close_ksize": 3, "roi_xyxy_norm": [0.0, 0.0, 0.6, 1.0]},
    {"fill_holes": True, "min_area": 4},
    {"max_regions": 2, "connectivity": 4},
    {"open_ksize": 3, "close_ksize": 5, "fill_holes": True, "min_area": 3, "max_regions": 3},
]


@pytest.mark.parametrize("kw", CONFIGS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_equals_defect_head(kw, dtype, device):
    rng = np.random.default_rng(11)
    amap = ndi.gaussian_filter(rng.random((48, 64)), 2.0).astype(dtype)
    thr = float(np.quantile(amap, 0.8))
    out = extract_defects(torch.from_numpy(amap).to(device), pixel_threshold=thr, **kw)
    head = DefectHead(DefectsConfig(pixel_threshold=thr, **kw)).to(device)
    d = head(torch.from_numpy(amap).to(device)[None, None])
    np.testing.assert_array_equal(out["mask"], d.mask[0, 0].cpu().numpy().astype(np.uint8) * 255)
    assert [r["id"] for r in out["regions"]] == d.regions.label.tolist()
    assert [r["area"] for r in out["regions"]] == d.regions.area.tolist()
    assert [r["bbox_xyxy"] for r in out["regions"]] == d.regions.bbox_xyxy.tolist()
    assert [r["centroid_xy"] for r in out["regions"]] == d.regions.centroid_xy.tolist()
    assert [r["score_max"] for r in out["regions"]] == d.regions.score_max.double().tolist()
    assert [r["score_mean"] for r in out["regions"]] == d.regions.score_mean.double().tolist()
    assert out["map_stats_roi"] == {"max": float(d.roi_max[0]), "mean": float(d.roi_mean[0])}
    if "max_regions" in kw:
        assert len(out["regions"]) <= kw["max_regions"]
    # the mask holds exactly the reported regions (max_regions trims it too)
    assert int((out["mask"] > 0).sum()) == sum(r["area"] for r in out["regions"])
    if "roi_xyxy_norm" in kw:
        h, w = amap.shape
        x1, y1, x2, y2 = kw["roi_xyxy_norm"]
        inside = np.zeros(amap.shape, bool)
        inside[math.floor(y1 * h) : math.ceil(y2 * h), math.floor(x1 * w) : math.ceil(x2 * w)] = (
            True
        )
        assert not out["mask"][~inside].any()
        roi_vals = amap[inside].astype(np.float64)
        assert out["map_stats_roi"]["max"] == float(np.float32(roi_vals.max()))


def test_inputs_and_nan():
    m = np.zeros((5, 7), np.float32)
    m[1:3, 1:4] = 0.9
    m[2, 2] = np.nan  # a NaN pixel is never foreground
    out = extract_defects(m, pixel_threshold=0.5)
    assert out["mask"][2, 2] == 0 and out["regions"][0]["area"] == 5
    assert out["regions"][0]["score_max"] == pytest.approx(0.9)
    ints = extract_defects(np.array([[0, 3, 3], [0, 0, 3]], np.int64), pixel_threshold=2)
    assert ints["regions"][0]["area"] == 3 and ints["pixel_threshold"] == 2.0
    assert extract_defects(torch.zeros(1, 9), pixel_threshold=0.5)["regions"] == []
    full = extract_defects(np.ones((3, 4), np.float32), pixel_threshold=0.5)
    assert full["regions"][0]["bbox_xyxy"] == [0, 0, 3, 2] and full["mask"].min() == 255
    # an empty ROI: no regions and null stats
    empty = extract_defects(
        np.ones((4, 4), np.float32), pixel_threshold=0.5, roi_xyxy_norm=[0, 0, 0, 0]
    )
    assert empty["regions"] == [] and empty["map_stats_roi"] == {"max": None, "mean": None}


def test_pyimgano_keywords_and_errors():
    m = np.ones((4, 4), np.float32)
    neutral = {
        "mask_space": "roi",
        "border_ignore_px": 0,
        "map_smoothing_method": "none",
        "hysteresis_enabled": False,
        "mask_dilate_ksize": 0,
        "min_score_max": None,
        "merge_nearby_enabled": False,
        "max_regions_sort_by": "score_max",
    }
    assert extract_defects(m, pixel_threshold=0.5, **neutral)["regions"][0]["area"] == 16
    with pytest.raises(ValueError, match="mask_space must be one of 'roi', 'full', got 'all'"):
        extract_defects(m, pixel_threshold=0.5, mask_space="all")
    with pytest.raises(ValueError, match=r"anomaly_map must be 2D \(H, W\), got shape \(1, 4, 4\)"):
        extract_defects(m[None], pixel_threshold=0.5)
    with pytest.raises(TypeError, match=r"anomaly_map must be a NumPy array or a torch\.Tensor"):
        extract_defects([[1.0]], pixel_threshold=0.5)
    with pytest.raises(TypeError, match="anomaly_map must be a float NumPy array"):
        extract_defects(np.array([["a"]]), pixel_threshold=0.5)
    with pytest.raises(TypeError, match="pixel_threshold must be a number"):
        extract_defects(m, pixel_threshold="0.5")
    with pytest.raises(ValueError, match="open_ksize must be 0 or an odd integer >= 3"):
        extract_defects(m, pixel_threshold=0.5, open_ksize=2)


def test_against_pyimgano_when_installed():
    pyimgano_extract = pytest.importorskip("pyimgano.defects.extract")
    for _, amap in _maps():
        ours = extract_defects(amap, pixel_threshold=0.5)
        theirs = pyimgano_extract.extract_defects_from_anomaly_map(
            amap,
            pixel_threshold=0.5,
            roi_xyxy_norm=None,
            open_ksize=0,
            close_ksize=0,
            fill_holes=False,
            min_area=0,
            max_regions=None,
        )
        assert set(theirs) == set(ours)
        np.testing.assert_array_equal(ours["mask"] > 0, np.asarray(theirs["mask"]) > 0)

        def by_box(regions):
            return sorted((tuple(r["bbox_xyxy"]), r["area"]) for r in regions)

        assert by_box(ours["regions"]) == by_box(theirs["regions"])  # ids differ (OpenCV's)
        for r in ours["regions"]:
            match = [t for t in theirs["regions"] if t["bbox_xyxy"] == r["bbox_xyxy"]]
            assert any(abs(t["score_max"] - r["score_max"]) <= 1e-6 for t in match)


def test_docs_pyimgano_python_blocks_run():
    import os
    import re

    path = os.path.join(os.path.dirname(__file__), "..", "docs", "pyimgano.md")
    with open(path, encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/pyimgano.md", "exec"), {})
