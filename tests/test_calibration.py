import datetime
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchdefects
from torchdefects import calibration as calmod
from torchdefects.calibration import (
    CalibrationNotExactError,
    PixelThresholdCalibrator,
    resolve_pixel_threshold,
)
from torchdefects.config import DefectsConfig, save_config

QS = [0.0, 0.5, 0.9, 0.999, 1.0]
PROVENANCE_KEYS = {
    "source",
    "method",
    "q",
    "calibration_map_count",
    "calibration_pixel_count",
    "roi_xyxy_norm",
    "roi_pixel_count",
    "roi_used",
    "roi_reason",
    "map_pixel_count",
    "exactness",
    "passes",
    "normal_min",
    "normal_max",
    "normal_quantiles",
    "fingerprint",
    "torchdefects_version",
    "created_at",
}


def _roi_pixels(maps, roi):
    """Oracle ROI crop, written from DESIGN.md directly (not from the library)."""
    h, w = maps.shape[-2:]
    if roi is None:
        return maps.reshape(-1)
    x1, y1, x2, y2 = (min(max(v, 0.0), 1.0) for v in roi)
    x1, x2 = sorted((x1, x2))
    y1, y2 = sorted((y1, y2))
    cols = slice(math.floor(x1 * w), math.ceil(x2 * w))
    rows = slice(math.floor(y1 * h), math.ceil(y2 * h))
    return maps.reshape(-1, h, w)[:, rows, cols].reshape(-1)


def _oracle(batches, q, roi=None):
    allp = np.concatenate([_roi_pixels(np.asarray(b), roi) for b in batches])
    return float(np.quantile(allp.astype(np.float64), q))


def _tied(rng, shape, levels=13):
    # few distinct values: many ties and duplicates
    return (rng.integers(0, levels, size=shape) / 7.0).astype(np.float32)


def _run(batches, q, roi=None, device="cpu", **kw):
    return _feed(PixelThresholdCalibrator(q=q, roi_xyxy_norm=roi, **kw), batches, device)


def _feed(cal, batches, device="cpu"):
    for b in batches:
        cal.update(torch.as_tensor(b).to(device))
    if not cal.is_exact():
        cal.begin_second_pass()
        for b in batches:
            cal.update(torch.as_tensor(b).to(device))
    return cal.compute()


@pytest.mark.parametrize("q", QS)
@pytest.mark.parametrize("roi", [None, [0.1, 0.25, 0.8, 0.9], [0.9, 1.2, 0.3, -0.1]])
def test_equals_numpy_quantile_with_ties(q, roi, device):
    rng = np.random.default_rng(0)
    batches = [_tied(rng, (int(rng.integers(1, 5)), 1, 12, 17)) for _ in range(7)]
    t, prov = _run(batches, q, roi, device)
    assert t == _oracle(batches, q, roi)
    # pyimgano's meanings: calibration_pixel_count = pixels in the quantile (all maps),
    # roi_pixel_count = ROI pixels per map (null without a ROI)
    assert prov["calibration_pixel_count"] == sum(_roi_pixels(b, roi).size for b in batches)
    per_map = _roi_pixels(batches[0][:1], roi).size
    assert prov["roi_pixel_count"] == (None if roi is None else per_map)
    assert prov["roi_used"] is (roi is not None)
    assert prov["map_pixel_count"] == sum(np.asarray(b).size for b in batches)


@pytest.mark.parametrize("q", QS)
def test_many_small_batches_equal_one_big_batch(q, device):
    rng = np.random.default_rng(1)
    maps = rng.random((64, 16, 16)).astype(np.float32)
    maps[::3] = np.round(maps[::3], 2)  # ties
    small = [maps[i : i + 1] for i in range(64)]
    t_small, p_small = _run(small, q, device=device)
    t_big, p_big = _run([maps], q, device=device)
    assert t_small == t_big == _oracle([maps], q)
    assert p_small["fingerprint"] == p_big["fingerprint"]


@pytest.fixture(scope="module")
def png_like_2_21():
    rng = np.random.default_rng(2)
    maps = rng.integers(0, 256, size=(256, 1, 64, 128), dtype=np.uint8)
    maps = (maps / 255.0).astype(np.float32)
    return list(np.split(maps, 32)), maps.astype(np.float64).ravel()


@pytest.mark.parametrize("q", [0.0, 0.001, 0.3, 0.5, 0.7, 0.9, 0.999, 1.0])
def test_prune_path_on_2_21_pixels(q, device, png_like_2_21):
    # More than _MIN_PRUNE values: the kept set is pruned and the cut ties counted.
    batches, flat = png_like_2_21
    t, _ = _run(batches, q, device=device)
    assert t == float(np.quantile(flat, q))


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    q=st.one_of(st.sampled_from(QS), st.floats(0.0, 1.0)),
    levels=st.integers(1, 40),
)
def test_property_small_prune_threshold(data, q, levels):
    # A tiny prune threshold exercises pruning, cut ties and the second pass on small data.
    old = calmod._MIN_PRUNE
    calmod._MIN_PRUNE = 8
    try:
        n_batches = data.draw(st.integers(1, 6))
        seed = data.draw(st.integers(0, 2**31))
        rng = np.random.default_rng(seed)
        batches = []
        for _ in range(n_batches):
            b = data.draw(st.integers(1, 3))
            h, w = data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9))
            scale = data.draw(st.sampled_from([1.0, 0.01, 100.0]))
            batches.append((_tied(rng, (b, h, w), levels) * scale).astype(np.float32))
        cal = PixelThresholdCalibrator(q=q)
        # no margin in the first pass: stress the exactness check and the second pass
        cal._target = lambda: cal._need(cal._fixed_count or max(cal._n, 1))
        t, prov = _feed(cal, batches)
        assert t == _oracle(batches, q)
        _check_extras(prov, batches, q)
    finally:
        calmod._MIN_PRUNE = old


def _check_extras(prov, batches, q, roi=None):
    """normal_min / max always exact; each normal quantile null or equal to numpy's."""
    allp = np.concatenate([_roi_pixels(np.asarray(b), roi) for b in batches]).astype(np.float64)
    allp = allp[~np.isnan(allp)]
    assert prov["normal_min"] == float(allp.min()) and prov["normal_max"] == float(allp.max())
    for key, v in prov["normal_quantiles"].items():
        qq = float(key)
        if q >= 0.5 and qq >= q:
            assert v is not None, key  # a quantile above q is always among the kept values
        if v is not None:
            assert v == float(np.quantile(allp, qq)), key


def test_late_high_values_need_a_second_pass():
    # High values first, then many lower distinct ones: need(N) outgrows what was kept.
    hi = torch.linspace(10.0, 20.0, 2**21).reshape(32, 256, 256)
    lo = torch.linspace(0.0, 1.0, 2**23).reshape(128, 256, 256)
    batches = [hi] + list(lo.split(32))
    cal = PixelThresholdCalibrator(q=0.999)
    for b in batches:
        cal.update(b)
    assert not cal.is_exact()
    with pytest.raises(CalibrationNotExactError, match="begin_second_pass"):
        cal.compute()
    cal.begin_second_pass()
    for b in batches:
        cal.update(b)
    t, prov = cal.compute()
    allp = np.concatenate([b.numpy().ravel() for b in batches]).astype(np.float64)
    want = float(np.quantile(allp, 0.999))
    assert t == want
    assert prov["calibration_map_count"] == 32 + 128
    assert prov["passes"] == 2
    _check_extras(prov, batches, 0.999)


def test_second_pass_with_other_data_raises():
    cal = PixelThresholdCalibrator(q=0.5)
    cal.update(torch.rand(2, 8, 8))
    cal.begin_second_pass()
    cal.update(torch.rand(2, 8, 8))
    with pytest.raises(RuntimeError, match="second pass saw different data"):
        cal.compute()


def test_2_25_pixels_streamed_memory_bounded():
    n_maps, h, w = 512, 256, 256  # 2^25 pixels
    g = torch.Generator().manual_seed(3)
    cal = PixelThresholdCalibrator(q=0.999)
    chunks = []
    peak = 0
    for _ in range(n_maps // 32):
        b = (torch.rand(32, 1, h, w, generator=g) * 1000).round() / 1000  # ties
        chunks.append(b.numpy().reshape(-1))
        cal.update(b)
        peak = max(peak, cal.kept_count)
    n = n_maps * h * w
    need = n - math.floor(0.999 * (n - 1))
    assert n >= 2**25
    # kept values stay a small multiple of what exactness needs, far below n
    assert peak <= max(3 * (need + need // 2 + 4096), 2**20 + 32 * h * w)
    assert cal.kept_count <= 3 * (need + need // 2 + 4096)
    t, prov = cal.compute()
    allp = np.concatenate(chunks)
    del chunks
    assert t == float(np.quantile(allp.astype(np.float64), 0.999))
    assert prov["calibration_pixel_count"] == n


def test_float64_and_float16_inputs():
    rng = np.random.default_rng(4)
    a = rng.random((3, 10, 10))  # float64, values not representable in float32
    t, _ = _run([a], 0.9)
    assert t == float(np.quantile(a, 0.9))
    h = torch.rand(2, 1, 8, 8).half()
    t, _ = _run([h], 0.25)
    assert t == float(np.quantile(h.float().numpy().astype(np.float64), 0.25))


def test_infinities_like_numpy():
    a = np.array([[[-np.inf, 1.0, 2.0, np.inf]]], dtype=np.float32)
    for q in [0.0, 0.2, 0.5, 0.9, 1.0]:
        t, _ = _run([a], q)
        with np.errstate(invalid="ignore"):
            want = float(np.quantile(a.astype(np.float64), q))
        assert (math.isnan(t) and math.isnan(want)) or t == want


# ----------------------------------------------------------------------------
# NaN
# ----------------------------------------------------------------------------


def test_nan_raises_with_count():
    x = torch.rand(2, 6, 6)
    x[0, 1, 1] = x[1, 2, 3] = x[1, 0, 0] = float("nan")
    cal = PixelThresholdCalibrator(q=0.5)
    with pytest.raises(ValueError, match="3 NaN pixels"):
        cal.update(x)
    assert cal.kept_count == 0
    with pytest.raises(ValueError, match="no ROI pixels seen"):
        cal.compute()


def test_nan_outside_roi_is_ignored():
    x = torch.rand(1, 10, 10)
    x[0, 9, 9] = float("nan")
    roi = [0.0, 0.0, 0.5, 0.5]
    cal = PixelThresholdCalibrator(q=0.5, roi_xyxy_norm=roi)
    assert cal.count_nan(x) == 0
    cal.update(x)
    assert cal.compute()[0] == _oracle([x.numpy()], 0.5, roi)


def test_nan_omit():
    x = torch.rand(3, 1, 7, 7, dtype=torch.float64)
    x[0, 0, 1, 1] = x[2, 0, 3, 3] = float("nan")
    t, prov = _run([x[:2], x[2:]], 0.75, nan_policy="omit")
    a = x.numpy().ravel()
    assert t == float(np.quantile(a[~np.isnan(a)], 0.75))
    assert prov["nan_policy"] == "omit"
    assert prov["nan_pixel_count"] == 2
    assert prov["calibration_pixel_count"] == 3 * 49 - 2
    assert prov["map_pixel_count"] == 3 * 49
    assert prov["roi_pixel_count"] is None  # no ROI
    assert prov["normal_min"] == float(np.nanmin(a)) and prov["normal_max"] == float(np.nanmax(a))


# ----------------------------------------------------------------------------
# Provenance and fingerprint
# ----------------------------------------------------------------------------


def test_provenance_fields():
    x = torch.rand(4, 1, 10, 20)
    roi = [0.8, 0.0, 0.2, 0.5]
    cal = PixelThresholdCalibrator(q=0.9, roi_xyxy_norm=roi)
    cal.update(x[:3])
    cal.update(x[3:])
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    t, prov = cal.compute()
    assert set(prov) == PROVENANCE_KEYS
    assert prov["source"] == "train_dir"
    assert prov["method"] == "normal_pixel_quantile"
    assert prov["q"] == 0.9
    assert prov["calibration_map_count"] == 4
    assert prov["calibration_pixel_count"] == 4 * 5 * 12  # rows 0..4, columns 4..15
    assert prov["map_pixel_count"] == 800
    assert prov["roi_xyxy_norm"] == [0.2, 0.0, 0.8, 0.5]
    assert prov["roi_pixel_count"] == 5 * 12  # per map, pyimgano's meaning
    assert prov["roi_used"] is True and prov["roi_reason"] is None
    assert prov["exactness"] == "exact" and prov["passes"] == 1
    assert prov["fingerprint"].startswith("sha256:") and len(prov["fingerprint"]) == 71
    assert prov["torchdefects_version"] == torchdefects.__version__
    assert prov["created_at"].endswith("Z")
    created = datetime.datetime.fromisoformat(prov["created_at"].replace("Z", "+00:00"))
    assert created.tzinfo is not None and created >= before
    assert t == _oracle([x.numpy()], 0.9, roi)


def test_fingerprint_stable_and_sensitive():
    x = torch.rand(6, 1, 8, 8)

    def fp(batches, **kw):
        return _run(batches, 0.9, **kw)[1]["fingerprint"]

    base = fp([x])
    assert fp([x]) == base
    assert fp([x[:1], x[1:4], x[4:]]) == base  # batching does not matter
    assert fp([x[:, 0]]) == base  # (B, H, W) same as (B, 1, H, W)
    y = x.clone()
    y[5, 0, 7, 7] += 1e-6
    assert fp([y]) != base  # one value
    assert fp([x.flip(0)]) != base  # order
    assert fp([x.reshape(6, 1, 4, 16)]) != base  # shapes
    cal = PixelThresholdCalibrator(q=0.9)
    cal.update(torch.rand(2, 8, 8))
    cal.reset()
    cal.update(x)
    assert cal.compute()[1]["fingerprint"] == base


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------


def test_argument_errors():
    with pytest.raises(ValueError, match=r"q must be in \[0, 1\], got 1.5"):
        PixelThresholdCalibrator(q=1.5)
    with pytest.raises(ValueError, match="q must be finite, got nan"):
        PixelThresholdCalibrator(q=float("nan"))
    with pytest.raises(TypeError, match="q must be a number"):
        PixelThresholdCalibrator(q="0.9")
    with pytest.raises(ValueError, match="nan_policy must be one of 'raise', 'omit', got 'x'"):
        PixelThresholdCalibrator(nan_policy="x")
    with pytest.raises(ValueError, match="roi_xyxy_norm must be four numbers"):
        PixelThresholdCalibrator(roi_xyxy_norm=[0, 1])
    cal = PixelThresholdCalibrator()
    with pytest.raises(ValueError, match="no ROI pixels seen"):
        cal.compute()
    with pytest.raises(ValueError, match=r"maps must have shape .* got \[2, 3, 4, 5\]"):
        cal.update(torch.rand(2, 3, 4, 5))
    with pytest.raises(TypeError, match="maps must be float16"):
        cal.update(torch.zeros(1, 4, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"maps must be a torch\.Tensor"):
        cal.update(np.zeros((1, 4, 4)))
    with pytest.raises(RuntimeError, match="needs a first pass"):
        cal.begin_second_pass()


def test_empty_roi_raises():
    cal = PixelThresholdCalibrator(roi_xyxy_norm=[0.5, 0.5, 0.5, 0.5])
    cal.update(torch.rand(1, 4, 4))
    with pytest.raises(ValueError, match="the ROI is empty"):
        cal.compute()


def test_does_not_alias_caller_tensor():
    x = torch.rand(1, 4, 4)
    cal = PixelThresholdCalibrator(q=1.0)
    cal.update(x)
    want = float(x.max())
    x.fill_(100.0)
    assert cal.compute()[0] == want


# ----------------------------------------------------------------------------
# resolve_pixel_threshold
# ----------------------------------------------------------------------------


def test_resolve_order(tmp_path):
    cal = PixelThresholdCalibrator(q=0.5)
    cal.update(torch.arange(4.0).reshape(1, 2, 2))
    cfg = DefectsConfig(pixel_threshold=0.7)
    assert resolve_pixel_threshold(0.3, cfg, "c.json", cal) == (
        0.3,
        {"source": "explicit", "method": "fixed", "value": 0.3},
    )
    assert resolve_pixel_threshold(None, cfg, "c.json", cal) == (
        0.7,
        {"source": "infer_config", "method": "fixed", "value": 0.7, "path": "c.json"},
    )
    t, prov = resolve_pixel_threshold(None, DefectsConfig(), "c.json", cal)
    assert t == 1.5 and prov["source"] == "train_dir"
    # an old-vocabulary pair is converted
    t, prov = resolve_pixel_threshold(calibration=(0.4, {"source": "calibration", "q": 0.9}))
    assert (t, prov["q"], prov["source"], prov["upgraded_from"]) == (
        0.4,
        0.9,
        "train_dir",
        "calibration",
    )


def test_resolve_config_keeps_stored_provenance(tmp_path):
    stored = {"source": "calibration", "q": 0.99, "fingerprint": "sha256:ab"}
    path = str(tmp_path / "c.json")
    save_config(DefectsConfig(pixel_threshold=0.25, pixel_threshold_provenance=stored), path)
    t, prov = resolve_pixel_threshold(config_path=path)
    assert t == 0.25
    assert prov == {
        "source": "infer_config",
        "method": "fixed",
        "value": 0.25,
        "path": path,
        "stored_provenance": {
            "source": "train_dir",
            "method": "normal_pixel_quantile",
            "q": 0.99,
            "fingerprint": "sha256:ab",
            "roi_used": False,
            "roi_reason": None,
            "roi_pixel_count": None,
            "upgraded_from": "calibration",
        },
    }
    t, prov = resolve_pixel_threshold(config={"defects": {"pixel_threshold": 2}})
    assert (t, prov) == (
        2.0,
        {"source": "infer_config", "method": "fixed", "value": 2.0, "path": None},
    )


def test_resolve_error_names_three_ways():
    with pytest.raises(ValueError) as e:
        resolve_pixel_threshold(None, DefectsConfig(), "c.json", None)
    msg = str(e.value)
    assert "requires a pixel threshold" in msg
    assert "--pixel-threshold" in msg
    assert "defects.pixel_threshold" in msg
    assert "calibrate on normal maps" in msg
    with pytest.raises(ValueError, match="pixel_threshold must be finite, got inf"):
        resolve_pixel_threshold(float("inf"))


# ----------------------------------------------------------------------------
# Normal-pixel statistics and the provenance schema
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("q", [0.3, 0.9, 0.99, 0.999])
@pytest.mark.parametrize("roi", [None, [0.1, 0.25, 0.8, 0.9]])
def test_normal_stats_exact(q, roi, device):
    rng = np.random.default_rng(5)
    batches = [rng.normal(size=(3, 1, 40, 50)).astype(np.float32) for _ in range(6)]
    batches[2][0, 0, 20, 20] = 7.5  # one outlier: the max
    t, prov = _run(batches, q, roi, device)
    assert t == _oracle(batches, q, roi)
    _check_extras(prov, batches, q, roi)
    if q >= 0.99:
        assert None not in (prov["normal_quantiles"]["0.99"], prov["normal_quantiles"]["0.9999"])
    assert set(prov["normal_quantiles"]) == {"0.99", "0.999", "0.9999"}


def test_normal_stats_with_nan_omit_and_infinities():
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    x[0, 0, 0, 0] = float("nan")
    x[1, 0, 2, 2] = float("inf")
    t, prov = _run([x], 0.5, nan_policy="omit")
    assert prov["normal_max"] is None  # infinity is not JSON: null
    a = x.numpy().ravel()
    assert t == float(np.quantile(a[~np.isnan(a)], 0.5))
    assert prov["normal_min"] == float(np.nanmin(a))
    assert prov["normal_quantiles"]["0.9999"] is None or math.isfinite(
        prov["normal_quantiles"]["0.9999"]
    )


def test_roi_pixel_count_per_map_and_mixed_sizes():
    roi = [0.0, 0.0, 0.5, 0.5]
    cal = PixelThresholdCalibrator(q=0.9, roi_xyxy_norm=roi)
    cal.update(torch.rand(2, 8, 8))
    assert cal.compute()[1]["roi_pixel_count"] == 16
    cal.update(torch.rand(1, 10, 10))  # another size: no single per-map count
    _, prov = cal.compute()
    assert prov["roi_pixel_count"] is None and prov["calibration_pixel_count"] == 2 * 16 + 25


def test_provenance_schema_accepts_every_record(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    from torchdefects.config import PROVENANCE_SCHEMA

    cal = PixelThresholdCalibrator(q=0.99, roi_xyxy_norm=[0.1, 0.1, 0.9, 0.9])
    cal.update(torch.rand(3, 1, 16, 16))
    records = [cal.compute()[1], resolve_pixel_threshold(0.5)[1]]
    path = str(tmp_path / "c.json")
    save_config(DefectsConfig(pixel_threshold=0.5, pixel_threshold_provenance=records[0]), path)
    records.append(resolve_pixel_threshold(config=path)[1])
    for rec in records:
        jsonschema.validate(rec, PROVENANCE_SCHEMA)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"source": "train_dir", "method": "guess"}, PROVENANCE_SCHEMA)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"source": "somewhere"}, PROVENANCE_SCHEMA)


def test_resolve_strategy():
    cal = PixelThresholdCalibrator(q=0.5)
    cal.update(torch.arange(4.0).reshape(1, 2, 2))
    empty = DefectsConfig()
    with pytest.raises(ValueError, match="pixel_threshold_strategy=fixed requires a fixed"):
        resolve_pixel_threshold(None, empty, None, cal, strategy="fixed")
    with pytest.raises(ValueError, match="pixel_threshold_strategy=infer_config requires"):
        resolve_pixel_threshold(None, empty, None, cal, strategy="infer_config")
    assert (
        resolve_pixel_threshold(None, empty, None, cal, strategy="normal_pixel_quantile")[0] == 1.5
    )
    # a threshold given or in the config wins whatever the strategy (pyimgano's order)
    assert resolve_pixel_threshold(0.2, empty, None, cal, strategy="infer_config")[0] == 0.2
    cfg = DefectsConfig(pixel_threshold=0.7)
    assert resolve_pixel_threshold(None, cfg, None, cal, strategy="fixed")[0] == 0.7
    with pytest.raises(ValueError, match="strategy must be one of"):
        resolve_pixel_threshold(0.2, strategy="otsu")
