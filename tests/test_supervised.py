"""Supervised thresholds against scikit-learn and numpy.quantile."""

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, precision_recall_curve

from torchdefects.config import DefectsConfig
from torchdefects.metrics import DefectMetrics
from torchdefects.supervised import (
    image_threshold_f1,
    image_threshold_normal_quantile,
    segf1_threshold,
)


def _metrics(maps, gts, **kw):
    m = DefectMetrics(**kw)
    m.update(torch.from_numpy(maps), torch.from_numpy(gts))
    return m


def _sk_best(y, s):
    """Best F1 and its threshold from precision_recall_curve; ties: the lowest threshold."""
    p, r, t = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore"):
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)[:-1]
    i = int(np.flatnonzero(f1 >= f1.max() - 1e-12)[0])
    return t[i], f1[i]


@pytest.mark.parametrize("seed", range(6))
def test_segf1_is_sklearn_best_f1(seed):
    rng = np.random.default_rng(seed)
    maps = rng.random((3, 16, 16)).astype(np.float32)
    if seed % 2:
        maps = np.round(maps, 1).astype(np.float32)  # many ties
    gts = rng.random((3, 16, 16)) < 0.15
    maps[gts] += np.float32(0.2 * rng.random())
    thr, prov = segf1_threshold(_metrics(maps, gts))
    t, f1 = _sk_best(gts.ravel(), maps.ravel())
    assert thr == pytest.approx(float(t), abs=0) and prov["f1"] == pytest.approx(f1, abs=1e-12)
    pred = maps >= np.float32(thr)
    assert prov["f1"] == pytest.approx(f1_score(gts.ravel(), pred.ravel()), abs=1e-15)
    assert (prov["tp"], prov["fp"]) == (int((pred & gts).sum()), int((pred & ~gts).sum()))
    assert prov["method"] == "supervised_segf1" and prov["source"] == "train_dir"
    assert prov["exact"] is True


def test_segf1_ties_take_the_lowest_threshold():
    # Thresholds 0.8 and 0.5 both give F1 = 2/3: (tp=1, fp=0, fn=1) and (tp=2, fp=2, fn=0).
    maps = np.array([[[0.8, 0.5, 0.5, 0.5]]], np.float32)
    gts = np.array([[[True, True, False, False]]])
    thr, prov = segf1_threshold(_metrics(maps, gts))
    assert thr == 0.5 and prov["f1"] == pytest.approx(2 / 3)


def test_segf1_exact_fraction_beats_float_rounding():
    # Two F1 values that differ by less than float64 resolution of their ratio must still
    # be compared exactly: the result equals the brute force over Fractions.
    from fractions import Fraction

    rng = np.random.default_rng(3)
    maps = np.round(rng.random((2, 40, 40)), 2).astype(np.float32)
    gts = rng.random((2, 40, 40)) < 0.3
    thr, _ = segf1_threshold(_metrics(maps, gts))
    p = int(gts.sum())
    best = max(
        (Fraction(2 * int((maps[gts] >= t).sum()), int((maps >= t).sum()) + p), t)
        for t in np.unique(maps)
    )
    ties = [
        t
        for t in np.unique(maps)
        if Fraction(2 * int((maps[gts] >= t).sum()), int((maps >= t).sum()) + p) == best[0]
    ]
    assert thr == float(min(ties))


def test_segf1_respects_roi_and_nan():
    rng = np.random.default_rng(4)
    maps = rng.random((2, 20, 20)).astype(np.float32)
    gts = rng.random((2, 20, 20)) < 0.2
    maps[0, 0, :5] = np.nan
    roi = [0.0, 0.5, 1.0, 1.0]
    thr, prov = segf1_threshold(_metrics(maps, gts, config=DefectsConfig(roi_xyxy_norm=roi)))
    inside = np.zeros((2, 20, 20), bool)
    inside[:, 10:] = True
    ok = inside & ~np.isnan(maps)
    t, _ = _sk_best(gts[ok], maps[ok])
    assert thr == float(t) and prov["roi_xyxy_norm"] == roi
    assert prov["positive_pixel_count"] == int(gts[ok].sum())


def test_segf1_without_defects_is_an_error():
    maps = np.random.default_rng(5).random((2, 8, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="segf1 needs ground-truth defect pixels"):
        segf1_threshold(_metrics(maps, np.zeros(maps.shape, bool)))
    with pytest.raises(TypeError, match="metrics must be a DefectMetrics"):
        segf1_threshold(None)


def test_segf1_binned_picks_a_bucket_edge():
    rng = np.random.default_rng(6)
    maps = rng.random((2, 16, 16)).astype(np.float32)
    gts = rng.random((2, 16, 16)) < 0.2
    thr, prov = segf1_threshold(_metrics(maps, gts, bins=4))
    pred = maps >= np.float32(thr)
    assert prov["exact"] is False
    assert prov["f1"] == pytest.approx(f1_score(gts.ravel(), pred.ravel()), abs=1e-15)


@pytest.mark.parametrize("seed", range(5))
def test_image_f1_is_sklearn_best(seed):
    rng = np.random.default_rng(seed)
    s = np.round(rng.random(40), 1 + seed % 2)
    y = rng.random(40) < 0.4
    thr, prov = image_threshold_f1(s, y)
    t, f1 = _sk_best(y, s)
    assert thr == float(t) and prov["f1"] == pytest.approx(f1, abs=1e-12)
    assert prov["f1"] == pytest.approx(f1_score(y, s >= thr), abs=1e-15)
    assert prov["method"] == "image_f1"


def test_image_f1_errors_and_nan():
    with pytest.raises(ValueError, match="at least one defective image"):
        image_threshold_f1([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="labels must have the shape of scores"):
        image_threshold_f1([0.1, 0.2], [0, 0, 1])
    thr, prov = image_threshold_f1([0.1, np.nan, 0.9], [0, 1, 1])
    assert thr == 0.9 and prov["fn"] == 1  # a NaN score is never defective


@pytest.mark.parametrize("q", [0.0, 0.5, 0.9, 0.99, 1.0])
def test_normal_quantile_is_numpy(q):
    rng = np.random.default_rng(7)
    s = rng.random(31)
    y = rng.random(31) < 0.3
    thr, prov = image_threshold_normal_quantile(s, y, q)
    assert thr == float(np.quantile(s[~y], q))
    assert prov == {
        "source": "train_dir",
        "method": "normal_quantile",
        "q": q,
        "normal_image_count": int((~y).sum()),
        "flagged_normal_images": int((s[~y] >= thr).sum()),
    }


def test_normal_quantile_errors():
    with pytest.raises(ValueError, match=r"q must be a number in \[0, 1\], got 1.5"):
        image_threshold_normal_quantile([1.0], None, 1.5)
    with pytest.raises(ValueError, match="at least one normal image"):
        image_threshold_normal_quantile([1.0], [1])
    with pytest.raises(ValueError, match="1 normal images have a NaN score"):
        image_threshold_normal_quantile([1.0, np.nan], None)
