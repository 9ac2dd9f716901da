"""DefectMetrics against scikit-learn, SciPy and a plain NumPy PRO oracle."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from sklearn.metrics import f1_score, precision_recall_curve, roc_auc_score

from torchdefects import metrics as metrics_mod
from torchdefects.config import DefectsConfig
from torchdefects.head import DefectHead
from torchdefects.metrics import DefectMetrics, float_keys, keys_to_float, trapezoid_to

EIGHT = np.ones((3, 3), dtype=int)


# ----------------------------------------------------------------------------
# Oracles
# ----------------------------------------------------------------------------


def _valid(maps, roi=None):
    valid = ~np.isnan(maps)
    if roi is not None:
        h, w = maps.shape[1:]
        x1, y1, x2, y2 = roi
        inside = np.zeros((h, w), bool)
        inside[math.floor(y1 * h) : math.ceil(y2 * h), math.floor(x1 * w) : math.ceil(x2 * w)] = (
            True
        )
        valid &= inside[None]
    return valid


def pro_oracle(maps, gts, fpr_limit=0.3, roi=None):
    """MVTec AD AUPRO, literally: every distinct threshold, per-component overlap averaged."""
    valid = _valid(maps, roi)
    comps = []
    for m, g, v in zip(maps, gts, valid):
        lab, n = ndi.label(g & v if roi is None else g & _valid(m[None] * 0, roi)[0], EIGHT)
        for k in range(1, n + 1):
            vals = m[(lab == k) & v]
            if vals.size:
                comps.append(vals)
    neg = maps[valid & ~gts]
    thresholds = np.unique(maps[valid])[::-1]
    xs, ys = [0.0], [0.0]
    for t in thresholds:
        xs.append(float(np.mean(neg >= t)))
        ys.append(float(np.mean([np.mean(c >= t) for c in comps])))
    area = 0.0
    for i in range(1, len(xs)):
        x0, y0, x1, y1 = xs[i - 1], ys[i - 1], xs[i], ys[i]
        if x1 <= fpr_limit:
            area += 0.5 * (y0 + y1) * (x1 - x0)
        else:
            if x0 < fpr_limit:
                yc = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
                area += 0.5 * (y0 + yc) * (fpr_limit - x0)
            break
    return area / fpr_limit


def region_oracle(pred_labels, gts, normal):
    defects = found = found_iou = regions = hit = hit_iou = false_normal = 0
    for p, g, is_normal in zip(pred_labels, gts, normal):
        lab, n = ndi.label(g, EIGHT)
        ids = [r for r in np.unique(p) if r != 0]
        regions += len(ids)
        defects += n
        for k in range(1, n + 1):
            c = lab == k
            found += bool((c & (p > 0)).any())
            found_iou += any((c & (p == r)).sum() / (c | (p == r)).sum() >= 0.5 for r in ids)
        for r in ids:
            reg = p == r
            hit += bool((reg & g).any())
            hit_iou += any(
                (reg & (lab == k)).sum() / (reg | (lab == k)).sum() >= 0.5 for k in range(1, n + 1)
            )
            false_normal += bool(is_normal and not (reg & g).any())
    return defects, found, found_iou, regions, hit, hit_iou, false_normal


def _data(seed, b=4, h=24, w=20, decimals=None, nan=0.0, blobs=True):
    rng = np.random.default_rng(seed)
    maps = rng.random((b, h, w)).astype(np.float32)
    if decimals is not None:
        maps = np.round(maps, decimals).astype(np.float32)
    gts = np.zeros((b, h, w), bool)
    if blobs:
        seeds = rng.random((b, h, w)) < 0.02
        gts = ndi.binary_dilation(seeds, iterations=2, structure=np.ones((1, 3, 3)))
        gts[0] = False  # one normal image
        maps = np.where(gts, maps + 0.3 * rng.random((b, h, w)), maps).astype(np.float32)
    else:
        gts = rng.random((b, h, w)) < 0.2
    if nan:
        maps[rng.random((b, h, w)) < nan] = np.nan
    return maps, gts


def _run(maps, gts, config=None, batch=None, **kw):
    m = DefectMetrics(config, **kw)
    b = maps.shape[0]
    step = batch or b
    for i in range(0, b, step):
        m.update(torch.from_numpy(maps[i : i + step]), torch.from_numpy(gts[i : i + step]))
    return m.compute()


# ----------------------------------------------------------------------------
# Keys
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_keys_order_matches_values(dtype):
    rng = np.random.default_rng(1)
    finfo = np.finfo(dtype)
    v = np.concatenate(
        [
            rng.standard_normal(500) * 10.0 ** rng.integers(-30, 30, 500),
            [0.0, -0.0, np.inf, -np.inf, finfo.max, -finfo.max, finfo.tiny, -finfo.tiny],
            [finfo.smallest_subnormal, -finfo.smallest_subnormal, 1.0, -1.0],
        ]
    ).astype(dtype)
    keys = float_keys(torch.from_numpy(v)).numpy()
    a, b = np.meshgrid(np.arange(v.size), np.arange(v.size))
    assert np.array_equal(v[a] < v[b], keys[a] < keys[b])
    assert np.array_equal(v[a] == v[b], keys[a] == keys[b])  # -0.0 == 0.0
    back = keys_to_float(keys, dtype == np.float64)
    assert np.array_equal(back, v.astype(np.float64))


# ----------------------------------------------------------------------------
# Threshold-free pixel metrics
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seed,decimals,nan,blobs",
    [
        (0, None, 0.0, True),
        (1, 1, 0.0, True),
        (2, 2, 0.05, True),
        (3, None, 0.0, False),
        (4, 0, 0.0, True),
    ],
)
def test_pixel_auroc_and_aupro_against_oracles(seed, decimals, nan, blobs):
    maps, gts = _data(seed, decimals=decimals, nan=nan, blobs=blobs)
    r = _run(maps, gts)
    ok = ~np.isnan(maps)
    assert r["pixel_auroc"] == pytest.approx(roc_auc_score(gts[ok], maps[ok]), abs=1e-12)
    assert r["pixel_aupro"] == pytest.approx(pro_oracle(maps, gts), abs=1e-12)
    assert r["pixels"] == int(ok.sum()) and r["nan_pixels"] == int((~ok).sum())
    assert r["positive_pixels"] == int((gts & ok).sum())


@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_limit_and_interpolation(fpr_limit):
    maps, gts = _data(5, decimals=2)
    r = _run(maps, gts, fpr_limit=fpr_limit)
    assert r["pixel_aupro"] == pytest.approx(pro_oracle(maps, gts, fpr_limit), abs=1e-12)


def test_aupro_perfect_and_inverted_maps():
    _, gts = _data(6)
    perfect = gts.astype(np.float32)
    assert _run(perfect, gts)["pixel_aupro"] == pytest.approx(1.0)
    assert _run(perfect, gts)["pixel_auroc"] == 1.0
    assert _run(1 - perfect, gts)["pixel_aupro"] == 0.0
    assert _run(1 - perfect, gts)["pixel_auroc"] == 0.0


def test_trapezoid_to_cuts_exactly():
    x = np.array([0.0, 0.1, 0.1, 0.5, 1.0])
    y = np.array([0.0, 0.2, 0.6, 1.0, 1.0])
    # up to 0.1: triangle 0.01; then 0.6 -> 0.8 at 0.3 over 0.2: 0.14
    assert trapezoid_to(x, y, 0.3) == pytest.approx(0.01 + 0.14)
    assert trapezoid_to(x, y, 0.1) == pytest.approx(0.01)  # the vertical step adds nothing
    assert trapezoid_to(x, y, 2.0) == pytest.approx(np.trapezoid(y, x))


def test_roi_excludes_outside_pixels():
    maps, gts = _data(7, h=20, w=20)
    roi = [0.25, 0.1, 0.8, 0.9]
    r = _run(maps, gts, DefectsConfig(roi_xyxy_norm=roi))
    v = _valid(maps, roi)
    assert r["pixels"] == int(v.sum())
    assert r["pixel_auroc"] == pytest.approx(roc_auc_score(gts[v], maps[v]), abs=1e-12)
    assert r["pixel_aupro"] == pytest.approx(pro_oracle(maps, gts, roi=roi), abs=1e-12)


def test_float64_maps_keep_their_precision():
    maps, gts = _data(8)
    maps = maps.astype(np.float64)
    maps[gts] += 1e-12  # invisible in float32
    r = _run(maps, gts)
    assert r["pixel_auroc"] == pytest.approx(roc_auc_score(gts.ravel(), maps.ravel()), abs=1e-12)


def test_segf1_against_precision_recall_curve():
    for seed in range(4):
        maps, gts = _data(10 + seed, decimals=2 if seed % 2 else None)
        r = _run(maps, gts)
        p, rc, t = precision_recall_curve(gts.ravel(), maps.ravel())
        with np.errstate(invalid="ignore"):
            f1 = np.where(p + rc > 0, 2 * p * rc / (p + rc), 0)[:-1]
        best = r["pixel_best_f1"]
        assert best["f1"] == pytest.approx(f1.max(), abs=1e-12)
        # ties: the lowest threshold (sklearn's thresholds increase: the first maximum)
        assert best["threshold"] == pytest.approx(t[np.flatnonzero(f1 >= f1.max() - 1e-12)[0]])


# ----------------------------------------------------------------------------
# At the configured settings
# ----------------------------------------------------------------------------


def test_pixel_metrics_at_threshold_against_sklearn():
    maps, gts = _data(20, nan=0.02)
    r = _run(maps, gts, DefectsConfig(pixel_threshold=0.6))
    ok = ~np.isnan(maps)
    y, pred = gts[ok], maps[ok] >= np.float32(0.6)
    tp = int((y & pred).sum())
    assert r["pixel"]["tp"] == tp
    assert r["pixel"]["f1"] == pytest.approx(f1_score(y, pred), abs=1e-15)
    assert r["pixel"]["iou"] == pytest.approx(tp / (y | pred).sum(), abs=1e-15)
    assert r["pixel"]["precision"] == pytest.approx(tp / pred.sum(), abs=1e-15)


@pytest.mark.parametrize(
    "cfg",
    [
        dict(pixel_threshold=0.7),
        dict(pixel_threshold=0.6, open_ksize=3, close_ksize=3, fill_holes=True, min_area=4),
        dict(pixel_threshold=0.5, connectivity=4, max_regions=2),
    ],
)
def test_region_metrics_against_loop_oracle(cfg):
    maps, gts = _data(21, b=5, h=32, w=32)
    config = DefectsConfig(**cfg)
    r = _run(maps, gts, config, batch=2)
    d = DefectHead(config)(torch.from_numpy(maps))
    pred = d.labels[:, 0].numpy()
    normal = ~gts.reshape(len(gts), -1).any(1)
    defects, found, found_iou, regions, hit, hit_iou, false_normal = region_oracle(
        pred, gts, normal
    )
    reg = r["region"]
    assert (reg["defects"], reg["found"], reg["found_iou50"], reg["regions"]) == (
        defects,
        found,
        found_iou,
        regions,
    )
    assert reg["precision"] == (hit / regions if regions else None)
    assert reg["precision_iou50"] == (hit_iou / regions if regions else None)
    assert reg["false_alarms_in_normal_images"] == false_normal
    assert reg["false_alarms_per_normal_image"] == false_normal / normal.sum()
    assert reg["false_alarms"] == regions - hit
    pm = d.mask[:, 0].numpy()
    assert r["pixel"]["tp"] == int((pm & gts).sum())
    assert r["pixel"]["fp"] == int((pm & ~gts).sum())


def test_image_metrics_against_sklearn():
    maps, gts = _data(22, b=12)
    config = DefectsConfig(pixel_threshold=0.9, image_threshold=1.1)
    r = _run(maps, gts, config, batch=5)
    y = gts.reshape(12, -1).any(1)
    score = maps.reshape(12, -1).max(1)
    im = r["image"]
    assert im["auroc"] == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    assert im["f1"] == pytest.approx(f1_score(y, score >= np.float32(1.1)), abs=1e-15)
    assert r["normal_images"] == int((~y).sum())


def test_image_labels_given_override_ground_truth():
    maps, gts = _data(23, b=6)
    labels = torch.tensor([1, 0, 1, 0, 1, 1])
    m = DefectMetrics(DefectsConfig(pixel_threshold=0.8))
    m.update(torch.from_numpy(maps), torch.from_numpy(gts), image_labels=labels)
    r = m.compute()
    score = maps.reshape(6, -1).max(1)
    assert r["image"]["auroc"] == pytest.approx(roc_auc_score(labels.numpy(), score))
    assert r["normal_images"] == 2


def test_defects_given_equal_head_run():
    maps, gts = _data(24)
    config = DefectsConfig(pixel_threshold=0.7, open_ksize=3)
    a = DefectMetrics(config)
    a.update(torch.from_numpy(maps), torch.from_numpy(gts))
    b = DefectMetrics(DefectHead(config))
    d = DefectHead(config)(torch.from_numpy(maps))
    b.update(torch.from_numpy(maps), torch.from_numpy(gts), defects=d)
    assert a.compute() == b.compute()


# ----------------------------------------------------------------------------
# Streaming, edge cases
# ----------------------------------------------------------------------------


def test_streaming_equals_one_shot_bit_identical(monkeypatch):
    maps, gts = _data(30, b=7, decimals=3, nan=0.01)
    config = DefectsConfig(pixel_threshold=0.75, min_area=2)
    once = _run(maps, gts, config)
    for batch in (1, 3):
        assert _run(maps, gts, config, batch=batch) == once
    monkeypatch.setattr(metrics_mod, "_MIN_MERGE", 1)  # merge after every batch
    assert _run(maps, gts, config, batch=2) == once
    rev = _run(maps[::-1].copy(), gts[::-1].copy(), config, batch=3)
    for key in ("pixel_auroc", "pixel_aupro", "pixel", "region", "pixel_best_f1"):
        assert rev[key] == once[key]


def test_all_normal_all_defective_and_empty():
    maps, _ = _data(31)
    normal = np.zeros(maps.shape, bool)
    r = _run(maps, normal, DefectsConfig(pixel_threshold=0.95))
    assert r["pixel_auroc"] is None and r["pixel_aupro"] is None and r["pixel_best_f1"] is None
    assert r["region"]["recall"] is None and r["defects"] == 0
    regions = int(
        DefectHead(DefectsConfig(pixel_threshold=0.95))(torch.from_numpy(maps)).num_regions.sum()
    )
    assert r["region"]["false_alarms_per_normal_image"] == regions / 4
    assert r["image"]["auroc"] is None
    full = np.ones(maps.shape, bool)
    r = _run(maps, full, DefectsConfig(pixel_threshold=0.5))
    assert r["pixel_auroc"] is None and r["pixel_aupro"] is None  # no negative pixel
    assert r["pixel_best_f1"]["recall"] == 1.0 and r["region"]["defects"] == 4
    m = DefectMetrics()
    r = m.compute()
    assert r["images"] == 0 and r["pixel_auroc"] is None and r["pixel"] is None
    m.update(torch.zeros(0, 1, 4, 4), torch.zeros(0, 1, 4, 4, dtype=torch.bool))
    assert m.compute()["images"] == 0


def test_all_nan_image():
    maps, gts = _data(32)
    maps[1] = np.nan
    r = _run(maps, gts, DefectsConfig(pixel_threshold=0.7))
    assert r["image"]["nan_scores"] == 1
    ok = ~np.isnan(maps)
    assert r["pixel_auroc"] == pytest.approx(roc_auc_score(gts[ok], maps[ok]))
    assert r["pixel_aupro"] == pytest.approx(pro_oracle(maps, gts))


def test_reset_forgets():
    maps, gts = _data(33)
    m = DefectMetrics(DefectsConfig(pixel_threshold=0.6))
    m.update(torch.from_numpy(maps), torch.from_numpy(gts))
    first = m.compute()
    m.update(torch.from_numpy(maps), torch.from_numpy(gts))
    assert m.compute()["images"] == 8
    m.reset()
    m.update(torch.from_numpy(maps), torch.from_numpy(gts))
    assert m.compute() == first


# ----------------------------------------------------------------------------
# Binned mode
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 6])
def test_binned_within_reported_bound(bits):
    maps, gts = _data(40, b=6)
    exact = _run(maps, gts)
    binned = _run(maps, gts, bins=bits)
    assert binned["mode"] == f"binned_{bits}_mantissa_bits"
    assert binned["pixel_auroc_error_bound"] > 0
    err = abs(binned["pixel_auroc"] - exact["pixel_auroc"])
    assert err <= binned["pixel_auroc_error_bound"] + 1e-12
    err = abs(binned["pixel_aupro"] - exact["pixel_aupro"])
    assert err <= binned["pixel_aupro_error_bound"] + 1e-12
    for limit in (0.01, 0.02, 0.07):  # a bucket straddles a small limit
        e, bnd = _run(maps, gts, fpr_limit=limit), _run(maps, gts, bins=bits, fpr_limit=limit)
        assert abs(bnd["pixel_aupro"] - e["pixel_aupro"]) <= bnd["pixel_aupro_error_bound"] + 1e-12
    # every bucket edge keeps exact counts
    m = DefectMetrics(bins=bits)
    m.update(torch.from_numpy(maps), torch.from_numpy(gts))
    c = m.curve()
    for t, tp, fp in zip(c.thresholds[:20], c.tp[:20], c.fp[:20]):
        assert tp == int((maps[gts] >= t).sum()) and fp == int((maps[~gts] >= t).sum())
    assert c.thresholds.size <= 2 ** (9 + bits)


def test_exact_mode_reports_no_error_bound():
    maps, gts = _data(41, decimals=1)
    r = _run(maps, gts)
    assert r["pixel_auroc_error_bound"] == 0.0 and r["pixel_aupro_error_bound"] == 0.0


# ----------------------------------------------------------------------------
# Errors, devices
# ----------------------------------------------------------------------------


def test_errors_name_the_argument():
    m = DefectMetrics()
    with pytest.raises(TypeError, match="gt_mask must be a bool tensor"):
        m.update(torch.rand(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))
    with pytest.raises(TypeError, match="anomaly_map must be float16"):
        m.update(torch.zeros(1, 1, 4, 4, dtype=torch.int32), torch.zeros(1, 1, 4, 4).bool())
    with pytest.raises(
        ValueError, match=r"gt_mask must have the shape of anomaly_map \[1, 1, 4, 4\]"
    ):
        m.update(torch.rand(1, 1, 4, 4), torch.zeros(1, 1, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"image_labels must have shape \(1,\)"):
        m.update(torch.rand(1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.bool), torch.ones(2))
    m.update(torch.rand(1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="must keep its precision"):
        m.update(torch.rand(1, 4, 4).double(), torch.zeros(1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="fpr_limit must be in"):
        DefectMetrics(fpr_limit=0.0)
    with pytest.raises(ValueError, match=r"bins must be in 1\.\.22"):
        DefectMetrics(bins=30)
    with pytest.raises(TypeError, match="config must be a DefectsConfig"):
        DefectMetrics({"pixel_threshold": 0.5})


def test_device(device):
    maps, gts = _data(50, b=5, nan=0.01)
    config = DefectsConfig(pixel_threshold=0.7, open_ksize=3, min_area=2)
    cpu = _run(maps, gts, config, batch=2)
    m = DefectMetrics(config)
    for i in range(0, 5, 2):
        m.update(
            torch.from_numpy(maps[i : i + 2]).to(device),
            torch.from_numpy(gts[i : i + 2]).to(device),
        )
    assert m.compute() == cpu


def test_docstring_examples_run():
    import doctest

    for mod in (metrics_mod, __import__("torchdefects.supervised", fromlist=["x"])):
        result = doctest.testmod(mod, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0 and result.attempted > 0, mod.__name__


def test_docs_python_block_runs():
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parents[1] / "docs" / "evaluation.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(encoding="utf-8"), re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, str(doc), "exec"), {})


def _spiral(n):
    """A one-pixel-wide square spiral path from the centre (one component, arms 1 apart)."""
    g = np.zeros((n, n), bool)
    y = x = n // 2
    g[y, x] = True
    step, k = 2, 0
    while True:
        for _ in range(2):
            dy, dx = ((0, 1), (1, 0), (0, -1), (-1, 0))[k % 4]
            for _ in range(step):
                y, x = y + dy, x + dx
                if not (0 <= y < n and 0 <= x < n):
                    return g
                g[y, x] = True
            k += 1
        step += 2


@pytest.mark.parametrize("shape", ["checker", "spiral", "row", "column", "border"])
def test_structured_ground_truth(shape):
    rng = np.random.default_rng(60)
    if shape == "checker":
        g = (np.indices((17, 15)).sum(0) % 2 == 0)[None]  # one 8-connected defect
    elif shape == "spiral":
        g = _spiral(21)[None]
    elif shape == "row":
        g = rng.random((1, 1, 40)) < 0.3
    elif shape == "column":
        g = rng.random((1, 40, 1)) < 0.3
    else:
        g = np.zeros((1, 12, 12), bool)
        g[0, 0, :] = g[0, :, -1] = True
        g[0, 5:8, 0] = True
    g = np.concatenate([g, np.zeros_like(g)])
    maps = (rng.random(g.shape) + 0.6 * g).astype(np.float32)
    config = DefectsConfig(pixel_threshold=0.9)
    r = _run(maps, g, config)
    assert r["pixel_auroc"] == pytest.approx(roc_auc_score(g.ravel(), maps.ravel()), abs=1e-12)
    assert r["pixel_aupro"] == pytest.approx(pro_oracle(maps, g), abs=1e-12)
    pred = DefectHead(config)(torch.from_numpy(maps)).labels[:, 0].numpy()
    defects, found, *_ = region_oracle(pred, g, [False, True])
    assert (r["region"]["defects"], r["region"]["found"]) == (defects, found)
    if shape in ("checker", "spiral"):
        assert defects == 1


def test_region_metrics_with_roi():
    maps, gts = _data(61, b=4, h=30, w=30)
    roi = [0.2, 0.0, 0.7, 0.8]
    config = DefectsConfig(pixel_threshold=0.8, roi_xyxy_norm=roi)
    r = _run(maps, gts, config)
    inside = _valid(np.zeros_like(maps), roi)
    pred = DefectHead(config)(torch.from_numpy(maps)).labels[:, 0].numpy()
    normal = ~gts.reshape(4, -1).any(1)  # image labels use the whole ground truth
    defects, found, *_, false_normal = region_oracle(pred, gts & inside, normal)
    assert (r["region"]["defects"], r["region"]["found"]) == (defects, found)
    assert r["region"]["false_alarms_in_normal_images"] == false_normal


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_maps_equal_their_float32_upcast(dtype):
    maps, gts = _data(62)
    low = torch.from_numpy(maps).to(dtype)
    config = DefectsConfig(pixel_threshold=0.75)
    a = DefectMetrics(config)
    a.update(low, torch.from_numpy(gts))
    b = DefectMetrics(config)
    b.update(low.float(), torch.from_numpy(gts))
    assert a.compute() == b.compute()


def test_empty_spatial_size_is_an_error():
    with pytest.raises(ValueError, match="anomaly_map must have H > 0 and W > 0"):
        DefectMetrics().update(torch.zeros(1, 1, 0, 4), torch.zeros(1, 1, 0, 4, dtype=torch.bool))


def test_property_against_oracles():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=25, deadline=None)
    @given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.integers(1, 9), st.integers(1, 9))
    def check(seed, b, h, w):
        rng = np.random.default_rng(seed)
        maps = rng.integers(0, 4, (b, h, w)).astype(np.float32)  # heavy ties
        gts = rng.random((b, h, w)) < rng.random()
        r = _run(maps, gts, DefectsConfig(pixel_threshold=2.0), batch=1 + seed % 2)
        y = gts.ravel()
        if y.all() or not y.any():
            assert r["pixel_auroc"] is None
        else:
            assert r["pixel_auroc"] == pytest.approx(roc_auc_score(y, maps.ravel()), abs=1e-12)
            assert r["pixel_aupro"] == pytest.approx(pro_oracle(maps, gts), abs=1e-12)

    check()


def test_maps_that_require_grad():
    maps, gts = _data(63)
    x = torch.from_numpy(maps).requires_grad_(True)
    m = DefectMetrics(DefectsConfig(pixel_threshold=0.7))
    m.update(x * 1.0, torch.from_numpy(gts))
    assert m.compute() == _run(maps, gts, DefectsConfig(pixel_threshold=0.7))
