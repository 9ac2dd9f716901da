import cv2
import numpy as np
import pytest
import torch

from tests._shapes import adversarial_masks
from torchdefects.ellipse import _rectangles, dilate_ellipse, ellipse_kernel


@pytest.mark.parametrize("k", list(range(1, 42)))
def test_kernel_bit_equal_opencv(k):
    ref = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)).astype(bool)
    assert np.array_equal(ellipse_kernel(k).numpy(), ref)


@pytest.mark.parametrize("k", list(range(1, 42)))
def test_rectangles_cover_the_kernel_exactly(k):
    # dilate_ellipse ORs the dilations by these rectangles: their union must be the element.
    ref = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)).astype(bool)
    union = np.zeros((k, k), bool)
    for row0, rows, col0, cols in _rectangles(k):
        assert ref[row0 : row0 + rows, col0 : col0 + cols].all()
        union[row0 : row0 + rows, col0 : col0 + cols] = True
    assert np.array_equal(union, ref)
    assert len(_rectangles(k)) <= k // 2 + 1


def cv2_dilate(m: np.ndarray, k: int) -> np.ndarray:
    se = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    return cv2.dilate(m.astype(np.uint8), se).astype(bool)


@pytest.mark.parametrize("k", [2, 3, 4, 5, 7, 9, 12, 15])
def test_dilate_matches_opencv(k, device):
    rng = np.random.default_rng(k)
    cases = [m for _, m in adversarial_masks()]
    cases += [rng.random(tuple(rng.integers(1, 30, 2))) < rng.random() * 0.3 for _ in range(30)]
    cases += [np.ones((1, 9), bool), np.ones((9, 1), bool), np.zeros((5, 5), bool)]
    for m in cases:
        ours = dilate_ellipse(torch.from_numpy(m)[None, None].to(device), k)[0, 0].cpu().numpy()
        assert np.array_equal(ours, cv2_dilate(m, k))


@pytest.mark.parametrize("k", [20, 25, 41])
def test_dilate_large_kernels_match_opencv(k):
    rng = np.random.default_rng(100 + k)
    cases = [
        rng.random((int(rng.integers(1, 70)), int(rng.integers(1, 70)))) < 0.01 for _ in range(6)
    ]
    cases += [np.pad(np.ones((1, 1), bool), 30), np.ones((3, 50), bool)]
    for m in cases:
        ours = dilate_ellipse(torch.from_numpy(m)[None, None], k)[0, 0].numpy()
        assert np.array_equal(ours, cv2_dilate(m, k))


def test_batch_script_empty():
    g = torch.Generator().manual_seed(0)
    m = torch.rand(4, 1, 20, 13, generator=g) < 0.05
    out = dilate_ellipse(m, 5)
    assert torch.equal(torch.jit.script(dilate_ellipse)(m, 5), out)
    for i in range(4):
        assert torch.equal(dilate_ellipse(m[i : i + 1], 5), out[i : i + 1])
    assert torch.equal(dilate_ellipse(m[:, 0], 5), out[:, 0])
    assert dilate_ellipse(torch.zeros(0, 1, 4, 4, dtype=torch.bool), 3).shape == (0, 1, 4, 4)
    assert torch.equal(dilate_ellipse(m, 0), m) and torch.equal(dilate_ellipse(m, 1), m)


def test_errors():
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        dilate_ellipse(torch.rand(1, 1, 3, 3), 3)
    with pytest.raises(ValueError, match="ksize must be an integer >= 0"):
        dilate_ellipse(torch.zeros(1, 1, 3, 3, dtype=torch.bool), -1)
    with pytest.raises(ValueError, match="ksize must be an integer >= 1"):
        ellipse_kernel(0)
