import math

import numpy as np
import pytest
import torch

from torchdefects.roi import roi_bounds, roi_mask, roi_stats, roi_tensor


def ref_roi_mask(roi, h, w):
    """Oracle: the DESIGN.md rule with Python floats (float64) and math.floor / math.ceil."""
    v = [min(max(float(x), 0.0), 1.0) for x in roi]
    x1, x2 = min(v[0], v[2]), max(v[0], v[2])
    y1, y2 = min(v[1], v[3]), max(v[1], v[3])
    m = np.zeros((h, w), bool)
    m[math.floor(y1 * h) : max(math.ceil(y2 * h), 0), math.floor(x1 * w) : math.ceil(x2 * w)] = True
    return m


ROIS = [
    [0.0, 0.0, 1.0, 1.0],
    [0.1, 0.2, 0.9, 0.8],
    [0.9, 0.8, 0.1, 0.2],  # reversed
    [0.3, 0.3, 0.7, 0.3],  # zero height on an exact pixel edge or not
    [-0.5, -1.0, 0.33, 2.0],  # clamped
    [0.25, 0.5, 0.75, 1.0],
    [0.3, 0.1, 0.6, 0.7],  # 0.3 * 10 = 3.0000000000000004 in float64
    [0.5, 0.5, 0.5, 0.5],
    [0.0, 0.0, 0.01, 0.01],
    [1.0, 1.0, 1.0, 1.0],
]
SIZES = [(1, 1), (1, 7), (7, 1), (10, 10), (3, 17), (256, 256), (100, 30)]


def test_smoke(device):
    m = roi_mask(torch.tensor([0.1, 0.2, 0.9, 0.8], device=device), 6, 8)
    assert m.shape == (6, 8) and m.dtype == torch.bool and m.device.type == device
    assert m.any()


@pytest.mark.parametrize("roi", ROIS)
def test_values_vs_python(roi, device):
    t = torch.tensor(roi, dtype=torch.float64, device=device)
    for h, w in SIZES:
        out = roi_mask(t, h, w).cpu().numpy()
        np.testing.assert_array_equal(out, ref_roi_mask(roi, h, w), err_msg=f"{roi} {h}x{w}")


def test_random_vs_python():
    rng = np.random.default_rng(0)
    for _ in range(200):
        roi = (rng.random(4) * 1.4 - 0.2).tolist()
        h, w = (int(x) for x in rng.integers(1, 50, size=2))
        out = roi_mask(torch.tensor(roi, dtype=torch.float64), h, w).numpy()
        np.testing.assert_array_equal(out, ref_roi_mask(roi, h, w))


def test_float32_roi_is_computed_in_float64():
    # The float32 value is widened exactly, then the rule runs in float64.
    roi32 = torch.tensor([0.3, 0.1, 0.7, 0.9], dtype=torch.float32)
    exact = [float(v) for v in roi32.tolist()]
    np.testing.assert_array_equal(roi_mask(roi32, 10, 10).numpy(), ref_roi_mask(exact, 10, 10))


def test_bounds():
    c0, c1, r0, r1 = roi_bounds(torch.tensor([0.9, 0.75, 0.1, 0.25]), 4, 10)
    assert (c0.item(), c1.item(), r0.item(), r1.item()) == (1, 9, 1, 3)


def test_empty(device):
    t = torch.tensor([0.1, 0.2, 0.9, 0.8], device=device)
    assert roi_mask(t, 0, 5).shape == (0, 5)
    assert roi_mask(t, 5, 0).shape == (5, 0)
    assert roi_mask(t, 0, 0).shape == (0, 0)


def test_scripted_equals_eager(device):
    scripted = torch.jit.script(roi_mask)
    for roi in ROIS:
        t = torch.tensor(roi, device=device)
        for h, w in SIZES:
            assert torch.equal(scripted(t, h, w), roi_mask(t, h, w))


def test_roi_tensor():
    t = roi_tensor([0.1, 0.2, 0.3, 0.4])
    assert t.dtype == torch.float64 and t.tolist() == [0.1, 0.2, 0.3, 0.4]
    assert roi_tensor(None).tolist() == [0.0, 0.0, 1.0, 1.0]


def test_exceptions():
    with pytest.raises(ValueError, match=r"roi must have shape \(4,\), got \[3\]"):
        roi_mask(torch.zeros(3), 4, 4)
    with pytest.raises(ValueError, match=r"roi must have shape \(4,\), got \[1, 4\]"):
        roi_mask(torch.zeros(1, 4), 4, 4)
    with pytest.raises(TypeError, match=r"roi must be a floating tensor, got torch\.int64"):
        roi_mask(torch.zeros(4, dtype=torch.int64), 4, 4)
    with pytest.raises(ValueError, match="height and width must be >= 0, got -1 and 4"):
        roi_mask(torch.zeros(4), -1, 4)
    with pytest.raises(ValueError, match="roi must be four numbers"):
        roi_tensor([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"roi\[2\] must be a finite number, got nan"):
        roi_tensor([0.1, 0.2, float("nan"), 0.4])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_roi_stats_vs_numpy(dtype, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 9, 13, generator=g).to(dtype)
    x[0, 0, 2:5, 3:6] = float("nan")
    x[1] = float("nan")  # all NaN: NaN out
    x[2, 0, 4, 4] = float("inf")
    for roi in (None, [0.3, 0.1, 0.9, 0.6], [0.5, 0.5, 0.5, 0.5]):
        t = None if roi is None else torch.tensor(roi, dtype=torch.float64, device=device)
        mx, mean = roi_stats(x.to(device), t)
        assert mx.dtype == torch.float32 and mean.dtype == torch.float32 and mx.shape == (4,)
        inside = ref_roi_mask(roi or [0, 0, 1, 1], 9, 13)
        for i in range(4):
            v = x[i, 0].double().numpy()[inside]
            v = v[~np.isnan(v)]
            want_max = np.float32(v.max()) if v.size else np.nan
            want_mean = v.mean() if v.size else np.nan
            np.testing.assert_array_equal(mx[i].item(), want_max)
            np.testing.assert_allclose(mean[i].item(), want_mean, rtol=1e-6)
    scripted = torch.jit.script(roi_stats)
    for a, b in zip(scripted(x, None), roi_stats(x)):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())
    empty_max, empty_mean = roi_stats(torch.zeros(2, 0, 5))
    assert empty_max.isnan().all() and empty_mean.isnan().all()
    assert roi_stats(torch.zeros(0, 1, 5, 5))[0].shape == (0,)


def test_argument_errors():
    m = torch.rand(2, 1, 4, 4)
    with pytest.raises(TypeError, match=r"anomaly_map must be a torch\.Tensor, got numpy\.ndarray"):
        roi_stats(m.numpy())
    with pytest.raises(ValueError, match="roi must be finite, got nan"):
        roi_stats(m, torch.tensor([float("nan"), 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="roi must be finite, got nan"):
        roi_mask(torch.tensor([0.0, 0.0, float("nan"), 1.0]), 4, 4)
    with pytest.raises(TypeError, match=r"height must be an integer, got 4\.0"):
        roi_mask(torch.zeros(4), 4.0, 4)
    with pytest.raises(TypeError, match="width must be an integer, got True"):
        roi_mask(torch.zeros(4), 4, True)
