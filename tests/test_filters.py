import cv2
import kornia
import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from torchdefects.filters import border_ignore, gaussian_kernel1d, smooth_map, smoothing_ksize

SHAPES = [(1, 1), (1, 2), (2, 1), (1, 17), (17, 1), (2, 2), (3, 3), (4, 6), (7, 5), (31, 40)]
# (method, ksize, sigma) as pyimgano passes them to OpenCV.
CASES = [
    ("gaussian", 3, 0.0),
    ("gaussian", 5, 0.0),
    ("gaussian", 7, 1.2),
    ("gaussian", 9, 0.0),
    ("gaussian", 11, 0.0),
    ("gaussian", 0, 1.5),
    ("gaussian", 4, 0.7),
    ("box", 3, 0.0),
    ("box", 4, 0.0),
    ("box", 5, 0.0),
    ("median", 3, 0.0),
    ("median", 5, 0.0),
]
# Gaussian: OpenCV sums rows then columns in float32 in its own order; ours in another.
GAUSS_RTOL = 2e-6


def cv2_smooth(m: np.ndarray, method: str, k: int, sigma: float) -> np.ndarray:
    """pyimgano's smooth_anomaly_map, written from its rules."""
    if method == "gaussian":
        if k <= 0:
            return cv2.GaussianBlur(m, (0, 0), sigma)
        k = k + 1 if k % 2 == 0 else k
        return cv2.GaussianBlur(m, (k, k), sigma)
    if method == "box":
        return cv2.blur(m, (k, k))
    return cv2.medianBlur(m, k)


def random_map(rng, h, w, scale=1.0):
    return (rng.standard_normal((h, w)) * scale).astype(np.float32)


@pytest.mark.parametrize("method,k,sigma", CASES)
def test_matches_opencv(method, k, sigma):
    rng = np.random.default_rng(hash((method, k, sigma)) % 2**32)
    for h, w in SHAPES:
        for scale in (1.0, 1e3):
            m = random_map(rng, h, w, scale)
            ours = smooth_map(torch.from_numpy(m)[None, None], method, k, sigma)[0, 0].numpy()
            ref = cv2_smooth(m, method, k, sigma)
            if method == "gaussian":
                np.testing.assert_allclose(ours, ref, rtol=0, atol=GAUSS_RTOL * np.abs(m).max())
            else:
                np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("k", [3, 5, 7, 9, 15])
def test_median_any_odd_size_matches_scipy(k):
    rng = np.random.default_rng(k)
    for h, w in SHAPES:
        m = random_map(rng, h, w)
        ours = smooth_map(torch.from_numpy(m)[None], "median", k)[0].numpy()
        np.testing.assert_array_equal(ours, ndi.median_filter(m, k, mode="nearest"))


def test_median_even_size_is_bumped():
    m = torch.rand(2, 1, 9, 9)
    assert torch.equal(smooth_map(m, "median", 4), smooth_map(m, "median", 5))


def test_gaussian_kernel_bit_equal_opencv():
    for k in range(1, 41, 2):
        for sigma in [0.0, 0.3, 0.8, 1.0, 1.5, 2.5, 5.0, 11.0]:
            ours = gaussian_kernel1d(k, sigma).numpy()
            ref = cv2.getGaussianKernel(k, sigma, ktype=cv2.CV_32F).ravel()
            np.testing.assert_array_equal(ours, ref)


def test_kornia_kernel_is_close_but_not_opencv():
    # Why we build OpenCV's kernel ourselves: kornia's agrees only to float rounding.
    ours = gaussian_kernel1d(11, 2.0)
    theirs = kornia.filters.get_gaussian_kernel1d(11, 2.0).view(-1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


def test_smoothing_ksize_rules():
    assert smoothing_ksize("none", 5) == 0
    assert smoothing_ksize("median", 1) == 0
    assert smoothing_ksize("median", 4) == 5
    assert smoothing_ksize("box", 4) == 4
    assert smoothing_ksize("box", 1) == 0
    assert smoothing_ksize("gaussian", 0, 0.0) == 0
    assert smoothing_ksize("gaussian", 0, 1.5) == 13
    assert smoothing_ksize("gaussian", 6) == 7


def test_noop_cases_return_map():
    m = torch.rand(2, 1, 5, 5)
    for method, k, s in [
        ("none", 5, 0.0),
        ("median", 1, 0.0),
        ("box", 0, 0.0),
        ("gaussian", 0, 0.0),
    ]:
        assert torch.equal(smooth_map(m, method, k, s), m)


def test_batch_equals_per_image_and_script(device):
    g = torch.Generator().manual_seed(0)
    m = torch.rand(5, 1, 23, 17, generator=g).to(device)
    scripted = torch.jit.script(smooth_map)
    for method, k, s in CASES:
        out = smooth_map(m, method, k, s)
        assert torch.equal(out, scripted(m, method, k, s))
        for i in range(m.shape[0]):
            assert torch.equal(out[i : i + 1], smooth_map(m[i : i + 1], method, k, s))
        assert torch.equal(smooth_map(m[:, 0], method, k, s), out[:, 0])


def test_dtypes():
    m = torch.rand(1, 1, 8, 8, dtype=torch.float64)
    assert smooth_map(m, "gaussian", 3).dtype == torch.float64
    assert smooth_map(m.half(), "box", 3).dtype == torch.float32
    m32 = m.float()
    torch.testing.assert_close(smooth_map(m, "gaussian", 5).float(), smooth_map(m32, "gaussian", 5))


def test_empty():
    for shape in [(0, 1, 5, 5), (2, 1, 0, 5), (2, 1, 5, 0)]:
        m = torch.rand(shape)
        for method, k, s in CASES:
            assert smooth_map(m, method, k, s).shape == m.shape
        assert border_ignore(m, 2).shape == m.shape


def test_errors():
    m = torch.rand(1, 1, 4, 4)
    with pytest.raises(ValueError, match="method must be one of"):
        smooth_map(m, "bilateral", 3)
    with pytest.raises(TypeError, match="anomaly_map must be float"):
        smooth_map(m > 0.5, "box", 3)
    with pytest.raises(ValueError, match="sigma must be a finite number"):
        smooth_map(m, "gaussian", 3, float("nan"))
    with pytest.raises(ValueError, match="anomaly_map must have shape"):
        smooth_map(torch.rand(2, 3, 4, 4), "box", 3)
    with pytest.raises(ValueError, match="border_px must be an integer >= 0"):
        border_ignore(m, -1)
    with pytest.raises(ValueError, match="ksize must be a positive odd integer"):
        gaussian_kernel1d(4)


def pyimgano_border(m: np.ndarray, n: int) -> np.ndarray:
    """pyimgano's apply_border_ignore_to_map, from its rules."""
    h, w = m.shape
    if n <= 0:
        return m
    if 2 * n >= h or 2 * n >= w:
        return np.zeros_like(m)
    out = m.copy()
    out[:n, :] = 0
    out[-n:, :] = 0
    out[:, :n] = 0
    out[:, -n:] = 0
    return out


@pytest.mark.parametrize("n", [0, 1, 2, 3, 8, 20])
def test_border_ignore_matches_pyimgano(n, device):
    rng = np.random.default_rng(n)
    for h, w in SHAPES:
        m = random_map(rng, h, w)
        ours = border_ignore(torch.from_numpy(m)[None, None].to(device), n)[0, 0].cpu().numpy()
        np.testing.assert_array_equal(ours, pyimgano_border(m, n))


def test_border_ignore_value_and_script():
    m = torch.rand(3, 9, 7)
    out = border_ignore(m, 2, float("-inf"))
    assert out.shape == m.shape and torch.isinf(out[:, :2]).all()
    assert torch.equal(torch.jit.script(border_ignore)(m, 2, 0.0), border_ignore(m, 2))


@pytest.mark.parametrize("k", [3, 5])
def test_median_with_ties_matches_opencv(k):
    # Few distinct values: many ties, where a wrong selection network would show.
    rng = np.random.default_rng(11 + k)
    for h, w in SHAPES:
        m = rng.integers(0, 3, (h, w)).astype(np.float32)
        ours = smooth_map(torch.from_numpy(m)[None, None], "median", k)[0, 0].numpy()
        np.testing.assert_array_equal(ours, cv2.medianBlur(m, k))


def test_device_bit_identical(device):
    # The sums are fixed sequences of elementwise ops: the same bits on every device.
    g = torch.Generator().manual_seed(3)
    m = torch.rand(3, 1, 37, 29, generator=g) * 7
    for method, k, s in CASES:
        ref = smooth_map(m, method, k, s)
        assert torch.equal(smooth_map(m.to(device), method, k, s).cpu(), ref), (method, k, s)


def test_index_padding_path_gives_the_same_bits(monkeypatch):
    # Export/tracing pads by index (no branch on the size); eager by F.pad: same copies.
    import torchdefects.filters as filters

    g = torch.Generator().manual_seed(5)
    m = torch.rand(2, 1, 19, 23, generator=g) * 5
    fast = [smooth_map(m, method, k, s) for method, k, s in CASES]
    monkeypatch.setattr(filters, "_can_pad", lambda *args: False)
    for (method, k, s), ref in zip(CASES, fast):
        assert torch.equal(smooth_map(m, method, k, s), ref), (method, k, s)
