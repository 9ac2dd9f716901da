"""The fused hole filling + labeling + statistics pass of DefectHead (``_fill_label``).

Oracles: SciPy ``binary_fill_holes`` then ``label`` for the labels, and the two public
stages it replaces (``fill_holes`` then ``_label_regions``, themselves tested against SciPy
and OpenCV) for every output, bit for bit.
"""

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F

from torchdefects import DefectHead, DefectsConfig
from torchdefects._fill_label import _fill_label_regions
from torchdefects.morphology import fill_holes
from torchdefects.regions import _label_regions


def _rings(n, step):
    m = np.zeros((n, n), bool)
    for k in range(0, n // 2, step):
        m[k, k : n - k] = m[n - 1 - k, k : n - k] = True
        m[k : n - k, k] = m[k : n - k, n - 1 - k] = True
    return m


def _spiral(n):
    m = np.zeros((n, n), bool)
    y0, x0, y1, x1 = 0, 0, n - 1, n - 1
    while y0 <= y1 and x0 <= x1:
        m[y0, x0 : x1 + 1] = True
        m[y0 : y1 + 1, x1] = True
        if y0 + 2 <= y1:
            m[y1, x0 : x1 + 1] = True
        if x0 + 2 <= x1:
            m[y0 + 2 : y1 + 1, x0] = True
        y0, x0, y1, x1 = y0 + 2, x0 + 2, y1 - 2, x1 - 2
    return m


def adversarial_masks():
    rng = np.random.default_rng(0)
    out = {
        "1x1_on": np.ones((1, 1), bool),
        "1x1_off": np.zeros((1, 1), bool),
        "1xN": rng.random((1, 37)) < 0.5,
        "Nx1": rng.random((41, 1)) < 0.5,
        "empty": np.zeros((9, 13), bool),
        "full": np.ones((9, 13), bool),
        "checker": (np.add.outer(np.arange(15), np.arange(16)) % 2) == 0,
        "rings1": _rings(21, 2),
        "rings2": _rings(24, 3),
        "spiral": _spiral(33),
        "frame": np.pad(np.zeros((5, 7), bool), 1, constant_values=True),
        "diag_hole": np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], bool),  # 4-hole, 8-ring
    }
    out["rings_inv"] = ~out["rings1"]
    out["checker_inv"] = ~out["checker"]
    out["spiral_inv"] = ~out["spiral"]
    return out


def assert_same(a, b):
    done, labels, counts, regions = a
    labels2, counts2, regions2 = b
    assert done
    assert torch.equal(labels, labels2) and labels.shape == labels2.shape
    assert torch.equal(counts, counts2)
    for name, u, v in zip(regions._fields, regions, regions2):
        assert u.dtype == v.dtype and torch.equal(u, v), name


def _both(mask, conn, x):
    return _fill_label_regions(mask, conn, x, x == x), _label_regions(fill_holes(mask), conn, x)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_adversarial_vs_scipy_and_stages(connectivity, device):
    structure = np.ones((3, 3)) if connectivity == 8 else None
    for name, m in adversarial_masks().items():
        mask = torch.from_numpy(m)[None, None].to(device)
        x = torch.rand(mask.shape, device=device)
        fused, staged = _both(mask, connectivity, x)
        assert_same(fused, staged)
        expected, n = ndi.label(ndi.binary_fill_holes(m), structure=structure)
        np.testing.assert_array_equal(fused[1][0, 0].cpu().numpy(), expected, err_msg=name)
        assert fused[2].item() == n, name


@pytest.mark.parametrize("connectivity", [4, 8])
def test_random_batches(connectivity, device):
    gen = torch.Generator().manual_seed(3)
    for _ in range(60):
        b, h, w = (int(v) for v in torch.randint(1, 30, (3,), generator=gen))
        b = b % 4 + 1
        x = torch.rand(b, 1, h, w, generator=gen)
        k = int(torch.randint(0, 3, (), generator=gen)) * 2 + 1
        if k > 1:
            x = F.avg_pool2d(x, k, 1, k // 2, count_include_pad=False)
        thr = float(torch.rand((), generator=gen))
        x = x.to(device)
        for mask in (x > thr, x < thr):
            assert_same(*_both(mask, connectivity, x))


def test_batch_position_and_dtype(device):
    gen = torch.Generator().manual_seed(4)
    x = F.avg_pool2d(torch.rand(5, 1, 40, 33, generator=gen), 5, 1, 2).to(device)
    mask = x > 0.5
    whole = _fill_label_regions(mask, 8, x, x == x)
    for i in range(5):
        one = _fill_label_regions(mask[i : i + 1], 8, x[i : i + 1], x[i : i + 1] == x[i : i + 1])
        assert torch.equal(one[1][0], whole[1][i])
    x64 = x.double()
    assert_same(*_both(mask, 8, x64))
    assert whole[3].score_max.dtype == torch.float32
    assert _fill_label_regions(mask, 8, x64, x64 == x64)[3].score_max.dtype == torch.float64


def test_scripted_equals_eager(device):
    scripted = torch.jit.script(_fill_label_regions)
    gen = torch.Generator().manual_seed(5)
    x = F.avg_pool2d(torch.rand(3, 1, 64, 48, generator=gen), 7, 1, 3).to(device)
    for conn in (4, 8):
        mask = x > 0.52
        assert_same(scripted(mask, conn, x, x == x), _label_regions(fill_holes(mask), conn, x))


def test_declines_on_nan():
    x = torch.rand(2, 1, 12, 12)
    x[1, 0, 3, 3] = float("nan")
    done = _fill_label_regions(x > 0.5, 8, x, x == x)[0]
    assert done is False


def test_head_nan_in_hole_falls_back(device):
    """A NaN pixel inside a ring stays background: the head's unfused path handles it."""
    m = torch.zeros(1, 1, 11, 11)
    m[0, 0, 2:9, 2:9] = 0.9
    m[0, 0, 4:7, 4:7] = 0.1
    m[0, 0, 5, 5] = float("nan")
    m = m.to(device)
    out = DefectHead(DefectsConfig(pixel_threshold=0.5, fill_holes=True))(m)
    expected = np.zeros((11, 11), bool)
    expected[2:9, 2:9] = True
    expected[5, 5] = False
    np.testing.assert_array_equal(out.mask[0, 0].cpu().numpy(), expected)
    assert out.regions.area.tolist() == [48]
