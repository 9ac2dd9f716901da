import numpy as np
import pytest
import scipy.ndimage as ndi
import skimage.filters as skf
import torch

from tests._shapes import adversarial_masks
from torchdefects.hysteresis import hysteresis_bounds, hysteresis_threshold
from torchdefects.roi import roi_mask


def oracle(m: np.ndarray, low: float, high: float, conn: int) -> np.ndarray:
    """SciPy label of ``m >= low`` and a per-component check for a pixel ``>= high``."""
    low, high = min(low, high), max(low, high)
    structure = np.ones((3, 3)) if conn == 8 else None
    lab, n = ndi.label(m >= low, structure=structure)
    keep = np.zeros(n + 1, bool)
    for i in range(1, n + 1):
        keep[i] = (m[lab == i] >= high).any()
    return keep[lab]


def smooth_map(rng, b, h, w):
    return ndi.gaussian_filter(rng.random((b, h, w)), (0, 1, 1)).astype(np.float32)


@pytest.mark.parametrize("conn", [4, 8])
def test_matches_oracle_per_image_thresholds(conn, device):
    rng = np.random.default_rng(conn)
    for _ in range(40):
        b = 3
        h, w = rng.integers(1, 40, 2)
        m = smooth_map(rng, b, h, w)
        low = np.float32(rng.random(b) * 0.5 + 0.2)
        high = np.float32(low + rng.random(b) * 0.3)
        if rng.random() < 0.3:
            low, high = high, low  # reversed: swapped per image
        out = hysteresis_threshold(
            torch.from_numpy(m).to(device),
            torch.from_numpy(low).to(device),
            torch.from_numpy(high).to(device),
            conn,
        ).cpu()
        for i in range(b):
            assert np.array_equal(out[i].numpy(), oracle(m[i], low[i], high[i], conn))


def test_equals_skimage_at_connectivity_4():
    # skimage compares with ">" where we use ">=": only maps with no pixel on a threshold.
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(60):
        h, w = rng.integers(2, 40, 2)
        m = smooth_map(rng, 1, h, w)[0]
        low, high = np.float32(np.quantile(m, [0.35, 0.9]) + 1e-4)
        if (m == low).any() or (m == high).any():
            continue
        ours = hysteresis_threshold(
            torch.from_numpy(m)[None], torch.tensor(low), torch.tensor(high), 4
        )
        assert np.array_equal(ours[0].numpy(), skf.apply_hysteresis_threshold(m, low, high))
        checked += 1
    assert checked > 40


def test_adversarial_masks():
    # A mask as a map: 1 on the mask, 0.5 seeds at one pixel of some components.
    for name, mk in adversarial_masks():
        m = mk.astype(np.float32) * 0.5
        ys, xs = np.nonzero(mk)
        m[ys[:: max(1, len(ys) // 3)], xs[:: max(1, len(ys) // 3)]] = 1.0
        for conn in (4, 8):
            out = hysteresis_threshold(
                torch.from_numpy(m)[None], torch.tensor(0.4), torch.tensor(0.9), conn
            )
            assert np.array_equal(out[0].numpy(), oracle(m, 0.4, 0.9, conn)), name


def test_nan_roi_script_batch():
    g = torch.Generator().manual_seed(1)
    m = torch.rand(4, 1, 17, 19, generator=g)
    m[0, 0, 3, 3] = float("nan")
    lo, hi = torch.tensor([0.5, 0.6, 0.4, 0.5]), torch.tensor(0.9)
    roi = torch.tensor([0.1, 0.2, 0.8, 0.9], dtype=torch.float64)
    out = hysteresis_threshold(m, lo, hi, 8, roi)
    assert not out[0, 0, 3, 3]
    assert not (out & ~roi_mask(roi, 17, 19)).any()
    assert torch.equal(torch.jit.script(hysteresis_threshold)(m, lo, hi, 8, roi), out)
    for i in range(4):
        assert torch.equal(hysteresis_threshold(m[i : i + 1], lo[i], hi, 8, roi), out[i : i + 1])
    # Pixels outside the ROI are never seeds: a ROI holding only weak pixels selects nothing.
    m2 = torch.zeros(1, 1, 4, 8)
    m2[0, 0, 1, :] = 0.6
    m2[0, 0, 1, 7] = 1.0
    roi2 = torch.tensor([0.0, 0.0, 0.5, 1.0], dtype=torch.float64)
    assert not hysteresis_threshold(m2, torch.tensor(0.5), torch.tensor(0.9), 8, roi2).any()


def test_empty_and_errors():
    assert hysteresis_threshold(
        torch.rand(0, 1, 4, 4), torch.tensor(0.1), torch.tensor(0.5)
    ).shape == (0, 1, 4, 4)
    assert not hysteresis_threshold(
        torch.rand(2, 1, 0, 4), torch.tensor(0.1), torch.tensor(0.5)
    ).any()
    with pytest.raises(ValueError, match="connectivity must be 4 or 8"):
        hysteresis_threshold(torch.rand(1, 4, 4), torch.tensor(0.1), torch.tensor(0.5), 6)
    with pytest.raises(ValueError, match="low must be a scalar or have shape"):
        hysteresis_threshold(torch.rand(2, 4, 4), torch.rand(3), torch.tensor(0.5))
    with pytest.raises(TypeError, match="anomaly_map must be float"):
        hysteresis_threshold(
            torch.ones(1, 4, 4, dtype=torch.bool), torch.tensor(0.1), torch.tensor(0.5)
        )


def test_bounds_follow_pyimgano():
    thr = torch.tensor([0.8, 0.6], dtype=torch.float64)
    lo, hi = hysteresis_bounds(thr)
    assert torch.equal(hi, thr) and torch.equal(lo, thr * 0.5)
    lo, hi = hysteresis_bounds(thr, low=0.3)
    assert torch.equal(lo, torch.full((2,), 0.3, dtype=torch.float64))
    lo, hi = hysteresis_bounds(thr, low=0.9, high=0.2)  # reversed: swapped
    assert torch.equal(lo, torch.full((2,), 0.2, dtype=torch.float64))
    assert torch.equal(hi, torch.full((2,), 0.9, dtype=torch.float64))
    lo, hi = hysteresis_bounds(thr, high=1.0)
    assert torch.equal(lo, torch.full((2,), 0.5, dtype=torch.float64))


def test_device_bit_identical(device):
    g = torch.Generator().manual_seed(4)
    m = torch.rand(3, 1, 37, 29, generator=g)
    lo, hi = torch.tensor([0.5, 0.6, 0.7]), torch.tensor(0.9)
    ref = hysteresis_threshold(m, lo, hi, 8)
    assert torch.equal(
        hysteresis_threshold(m.to(device), lo.to(device), hi.to(device), 8).cpu(), ref
    )
