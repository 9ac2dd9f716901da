import numpy as np
import pytest
import torch

from torchdefects.threshold import binarize

NAN, INF = float("nan"), float("inf")


def ref_binarize(m: np.ndarray, thr, roi_mask=None):
    """Oracle per image: compare in float32 (float64 maps: float64), outside the ROI is False."""
    dt = np.float64 if m.dtype == np.float64 else np.float32
    out = m.astype(dt) >= np.asarray(thr, dtype=np.float64).astype(dt)
    if roi_mask is not None:
        out &= roi_mask
    return out


def realistic(b, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 1, h, w, generator=g)
    x[:, :, 0, 0] = NAN
    x[:, :, -1, -1] = INF
    x[:, :, 0, -1] = -INF
    return x


def test_smoke(device):
    m = realistic(2, 8, 9).to(device)
    out = binarize(m, torch.tensor(0.5, device=device))
    assert out.shape == m.shape and out.dtype == torch.bool and out.device == m.device
    assert binarize(m[:, 0], torch.tensor(0.5)).shape == (2, 8, 9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5, 0.999, -INF, INF, 1e-5])
def test_values(dtype, thr, device):
    m = realistic(3, 16, 20).to(dtype)
    out = binarize(m.to(device), torch.tensor(thr, dtype=torch.float64)).cpu()
    # float16/bfloat16 -> float32 is exact, so the oracle sees the very same values
    values = m.double().numpy() if dtype == torch.float64 else m.float().numpy()
    np.testing.assert_array_equal(out.numpy(), ref_binarize(values, thr))
    assert not out[:, :, 0, 0].any()  # NaN
    if thr != INF:
        assert out[:, :, -1, -1].all()  # +inf
    assert out[:, :, -1, -1].all() or thr == INF


def test_threshold_rounded_to_float32_for_float32_maps():
    thr = 0.1
    below = np.nextafter(np.float32(0.1), np.float32(0))  # just below float32(0.1)
    m = torch.tensor([[[[np.float32(0.1), below]]]])
    assert binarize(m, torch.tensor(thr, dtype=torch.float64)).flatten().tolist() == [True, False]


def test_float64_maps_compare_in_float64():
    t = 0.1
    just_below = np.nextafter(0.1, 0.0)  # rounds to float32(0.1), so float32 would say True
    m = torch.tensor([[[t, just_below]]], dtype=torch.float64)
    out = binarize(m, torch.tensor(t, dtype=torch.float64))
    assert out.flatten().tolist() == [True, False]


def test_per_image_threshold(device):
    m = realistic(4, 10, 12, seed=1).to(device)
    thr = torch.tensor([0.1, 0.5, 0.9, -1.0], device=device)
    out = binarize(m, thr).cpu()
    for i in range(4):
        np.testing.assert_array_equal(
            out[i].numpy(), ref_binarize(m[i].cpu().numpy(), thr[i].item())
        )
    # (1,) broadcasts; a Python number works in eager mode
    assert torch.equal(binarize(m, torch.tensor([0.5])), binarize(m, torch.tensor(0.5)))
    assert torch.equal(binarize(m, 0.5), binarize(m, torch.tensor(0.5)))


def test_roi_gate_wins_over_threshold(device):
    m = realistic(2, 10, 10, seed=2).to(device)
    roi = torch.tensor([0.8, 0.2, 0.3, 0.6], dtype=torch.float64, device=device)  # reversed
    inside = np.zeros((10, 10), bool)
    inside[2:6, 3:8] = True
    for thr in (-INF, -5.0, 0.0, 0.5):
        out = binarize(m, torch.tensor(thr), roi=roi).cpu().numpy()
        for i in range(2):
            expected = ref_binarize(m[i, 0].cpu().numpy(), thr, inside)
            np.testing.assert_array_equal(out[i, 0], expected)
        assert not out[:, :, ~inside].any()


def test_batch_equals_per_image(device):
    m = realistic(5, 9, 7, seed=3).to(device)
    thr = torch.linspace(0.1, 0.9, 5, device=device)
    roi = torch.tensor([0.1, 0.1, 0.9, 0.7], device=device)
    batched = binarize(m, thr, roi)
    single = torch.cat([binarize(m[i : i + 1], thr[i], roi) for i in range(5)])
    assert torch.equal(batched, single)


def test_scripted_equals_eager(device):
    scripted = torch.jit.script(binarize)
    m = realistic(3, 11, 13, seed=4).to(device)
    roi = torch.tensor([0.2, 0.0, 0.7, 0.9], device=device)
    for thr in (torch.tensor(0.4), torch.tensor([0.1, 0.6, 0.9])):
        thr = thr.to(device)
        assert torch.equal(scripted(m, thr, roi), binarize(m, thr, roi))
        assert torch.equal(scripted(m, thr, None), binarize(m, thr))
        assert torch.equal(scripted(m.half(), thr, None), binarize(m.half(), thr))


@pytest.mark.parametrize("shape", [(0, 1, 4, 4), (2, 1, 0, 4), (2, 1, 4, 0), (0, 3, 3)])
def test_empty(shape, device):
    m = torch.zeros(shape, device=device)
    out = binarize(m, torch.tensor(0.5), roi=torch.tensor([0.0, 0.0, 0.5, 0.5]))
    assert out.shape == shape and out.dtype == torch.bool
    if shape[0] == 0:
        assert binarize(m, torch.zeros(0)).shape == shape


def test_exceptions():
    m = torch.rand(2, 1, 4, 4)
    with pytest.raises(
        TypeError, match="anomaly_map must be float16, bfloat16, float32 or float64"
    ):
        binarize(m.to(torch.int32), torch.tensor(0.5))
    with pytest.raises(ValueError, match=r"anomaly_map must have shape \(B, 1, H, W\) or \(B, H"):
        binarize(torch.rand(2, 3, 4, 4), torch.tensor(0.5))
    with pytest.raises(
        ValueError, match=r"pixel_threshold must be a scalar or have shape \(2,\), got \[3"
    ):
        binarize(m, torch.rand(3))
    with pytest.raises(
        TypeError, match=r"pixel_threshold must be a real number tensor, got torch\.bool"
    ):
        binarize(m, torch.tensor(True))
    with pytest.raises(ValueError, match=r"roi must have shape \(4,\)"):
        binarize(m, torch.tensor(0.5), roi=torch.zeros(2))


def test_argument_errors():
    m = torch.rand(2, 1, 4, 4)
    assert torch.equal(binarize(m, 0.5), binarize(m, torch.tensor(0.5)))
    with pytest.raises(TypeError, match=r"anomaly_map must be a torch\.Tensor, got numpy\.ndarray"):
        binarize(m.numpy(), 0.5)
    with pytest.raises(ValueError, match="pixel_threshold must be not NaN, got nan"):
        binarize(m, float("nan"))
    with pytest.raises(ValueError, match="pixel_threshold must be not NaN, got nan"):
        binarize(m, torch.tensor([0.2, float("nan")]))
    with pytest.raises(TypeError, match=r"pixel_threshold must be a number or a torch\.Tensor"):
        binarize(m, None)
    with pytest.raises(TypeError, match=r"pixel_threshold must be a number or a torch\.Tensor"):
        binarize(m, "0.5")
    # a NaN ROI used to give an empty mask silently
    with pytest.raises(ValueError, match="roi must be finite, got nan"):
        binarize(m, 0.5, roi=torch.tensor([0.0, float("nan"), 1.0, 1.0]))
    with pytest.raises(ValueError, match="roi must be finite, got inf"):
        binarize(m, 0.5, roi=torch.tensor([0.0, 0.0, float("inf"), 1.0]))
    with pytest.raises(TypeError, match=r"roi must be a torch\.Tensor, got list"):
        binarize(m, 0.5, roi=[0.0, 0.0, 1.0, 1.0])
