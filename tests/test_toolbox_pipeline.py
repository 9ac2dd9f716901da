"""The toolbox stages composed in the head's order == pyimgano's extractor, per image.

The oracle is pyimgano's ``extract_defects_from_anomaly_map`` rewritten here from its rules
with OpenCV and NumPy (pyimgano itself pulls torchvision and opencv-python, so it is not a
test dependency). The composition is ``scripts/render_presets.py``'s ``toolbox_pipeline``.
Cases use no ROI, no hole filling and no dilation, where pyimgano's order (component
filters before holes/dilation, ROI after them) and ours (ROI first, filters on the final
components) coincide.
"""

import os
import sys

import cv2
import numpy as np
import pytest
import torch

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
)


from render_presets import toolbox_pipeline

from torchdefects.shape import shape_stats


def _smooth(m, method, k, sigma):
    if method == "none":
        return m
    if method == "median":
        if k <= 1:
            return m
        return cv2.medianBlur(m, k + 1 if k % 2 == 0 else k)
    if method == "gaussian":
        if k <= 0:
            return m if sigma <= 0 else cv2.GaussianBlur(m, (0, 0), sigma)
        k = k + 1 if k % 2 == 0 else k
        return cv2.GaussianBlur(m, (k, k), sigma)
    return m if k <= 1 else cv2.blur(m, (k, k))


def _solidity(comp):
    cs, _ = cv2.findContours(comp.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    c = max(cs, key=cv2.contourArea)
    hull = cv2.contourArea(cv2.convexHull(c))
    return None if hull <= 0 else cv2.contourArea(c) / hull


def pyimgano_extract(amap, thr, kw):
    g = kw.get
    m = amap.astype(np.float32)
    n = g("border_ignore_px", 0)
    if n > 0:
        h, w = m.shape
        if 2 * n >= h or 2 * n >= w:
            m = np.zeros_like(m)
        else:
            m = m.copy()
            m[:n], m[-n:], m[:, :n], m[:, -n:] = 0, 0, 0, 0
    m = _smooth(
        m,
        g("map_smoothing_method", "none"),
        g("map_smoothing_ksize", 0),
        g("map_smoothing_sigma", 0.0),
    )
    if g("hysteresis_enabled", False):
        hi = g("hysteresis_high") if g("hysteresis_high") is not None else thr
        lo = g("hysteresis_low") if g("hysteresis_low") is not None else hi * 0.5
        lo, hi = min(lo, hi), max(lo, hi)
        _, lab = cv2.connectedComponents((m >= lo).astype(np.uint8), connectivity=8)
        seeds = np.unique(lab[m >= hi])
        mask = np.isin(lab, seeds[seeds != 0])
    else:
        mask = m >= thr
    mask = mask.astype(np.uint8)
    for key, op in (("open_ksize", cv2.MORPH_OPEN), ("close_ksize", cv2.MORPH_CLOSE)):
        if g(key, 0):
            mask = cv2.morphologyEx(mask, op, np.ones((g(key), g(key)), np.uint8))
    nl, lab, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = np.zeros_like(mask)
    for i in range(1, nl):
        x, y, w, h, a = stats[i]
        vals = m[lab == i]
        if a < g("min_area", 0):
            continue
        if g("min_score_max") is not None and vals.max() < g("min_score_max"):
            continue
        if g("min_score_mean") is not None and vals.mean() < g("min_score_mean"):
            continue
        if g("min_fill_ratio") is not None and a / (w * h) < g("min_fill_ratio"):
            continue
        if g("max_aspect_ratio") is not None and max(w / h, h / w) > g("max_aspect_ratio"):
            continue
        if g("min_solidity") is not None:
            s = _solidity(lab == i)
            if s is None or s < g("min_solidity"):
                continue
        keep[lab == i] = 1
    nl, lab, stats, _cent = cv2.connectedComponentsWithStats(keep, connectivity=8)
    regions = []
    for i in range(1, nl):
        x, y, w, h, a = stats[i]
        vals = m[lab == i]
        regions.append(
            dict(
                id=i,
                bbox=[x, y, x + w - 1, y + h - 1],
                area=int(a),
                score_max=round(float(vals.max()), 6),
                score_mean=round(float(vals.mean()), 6),
                members=[i],
            )
        )
    gap = g("merge_nearby_max_gap_px", 0)
    if g("merge_nearby_enabled", False) and gap > 0 and len(regions) > 1:
        parent = list(range(len(regions)))

        def find(i):
            while parent[i] != i:
                i = parent[i]
            return i

        for i in range(len(regions)):
            for j in range(i + 1, len(regions)):
                a, b = regions[i]["bbox"], regions[j]["bbox"]
                gx = max(0, b[0] - a[2] - 1, a[0] - b[2] - 1)
                gy = max(0, b[1] - a[3] - 1, a[1] - b[3] - 1)
                if gx <= gap and gy <= gap:
                    ri, rj = find(i), find(j)
                    parent[max(ri, rj)] = min(ri, rj)
        groups = {}
        for i in range(len(regions)):
            groups.setdefault(find(i), []).append(regions[i])
        merged = []
        for grp in groups.values():
            area = sum(r["area"] for r in grp)
            merged.append(
                dict(
                    id=min(r["id"] for r in grp),
                    bbox=[
                        min(r["bbox"][0] for r in grp),
                        min(r["bbox"][1] for r in grp),
                        max(r["bbox"][2] for r in grp),
                        max(r["bbox"][3] for r in grp),
                    ],
                    area=area,
                    score_max=max(r["score_max"] for r in grp),
                    score_mean=round(sum(r["score_mean"] * r["area"] for r in grp) / area, 6),
                    members=sorted(i for r in grp for i in r["members"]),
                )
            )
        regions = merged
    q = g("min_score_max_quantile")
    if q is not None and regions:
        t = float(np.quantile(np.asarray([r["score_max"] for r in regions], np.float32), q))
        regions = [r for r in regions if r["score_max"] >= t]
    key = g("max_regions_sort_by", "score_max")
    regions.sort(
        key=lambda r: (
            -r[key],
            -r["score_max"],
            -r["score_mean"],
            -r["area"],
            r["bbox"][1],
            r["bbox"][0],
        )
    )
    if g("max_regions") is not None:
        regions = regions[: g("max_regions")]
    return regions


CASES = [
    dict(min_area=4),
    dict(border_ignore_px=3, map_smoothing_method="gaussian", map_smoothing_ksize=5, min_area=2),
    dict(
        map_smoothing_method="median",
        map_smoothing_ksize=3,
        hysteresis_enabled=True,
        hysteresis_low=0.5,
    ),
    dict(
        map_smoothing_method="box",
        map_smoothing_ksize=3,
        hysteresis_enabled=True,
        hysteresis_low=0.72,  # reversed: swapped to low 0.55, high 0.72
        hysteresis_high=0.55,
    ),
    dict(open_ksize=3, close_ksize=3, min_fill_ratio=0.4, max_aspect_ratio=3.0, min_solidity=0.8),
    dict(min_score_max=0.75, min_score_mean=0.5, max_regions=3, max_regions_sort_by="area"),
    dict(merge_nearby_enabled=True, merge_nearby_max_gap_px=2, min_area=2),
    dict(
        merge_nearby_enabled=True,
        merge_nearby_max_gap_px=1,
        min_score_max_quantile=0.5,
        max_regions_sort_by="score_mean",
    ),
    dict(
        min_score_max_quantile=0.3,
        max_regions=5,
        map_smoothing_method="gaussian",
        map_smoothing_ksize=0,
        map_smoothing_sigma=1.2,
    ),
]


@pytest.mark.parametrize("kw", CASES)
def test_equals_pyimgano_extractor(kw):
    rng = np.random.default_rng(len(str(kw)))
    import scipy.ndimage as ndi

    maps = np.stack([ndi.gaussian_filter(rng.random((48, 64)), 1.5) for _ in range(3)]).astype(
        np.float32
    )
    maps = (maps - maps.min()) / (maps.max() - maps.min())
    thr = 0.6
    keys = {"connectivity": 8, **kw}
    _labels, regions = toolbox_pipeline(
        torch.from_numpy(maps)[:, None], torch.full((3,), thr, dtype=torch.float64), keys
    )
    shape = shape_stats(regions)
    for b in range(3):
        ref = pyimgano_extract(maps[b], thr, keys)
        sel = (regions.batch_index == b).nonzero().view(-1).tolist()
        assert len(sel) == len(ref), (b, len(sel), len(ref))
        for i, r in zip(sel, ref):
            assert regions.bbox_xyxy[i].tolist() == [int(v) for v in r["bbox"]]
            assert int(regions.area[i]) == r["area"]
            assert abs(float(regions.score_max[i]) - r["score_max"]) <= 1e-6
            assert abs(float(regions.score_mean[i]) - r["score_mean"]) <= 2e-6
            w = r["bbox"][2] - r["bbox"][0] + 1
            assert int(shape.bbox_area[i]) == w * (r["bbox"][3] - r["bbox"][1] + 1)
