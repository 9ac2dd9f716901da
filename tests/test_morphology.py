import cv2
import kornia
import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchdefects.morphology import closing, dilation, erosion, fill_holes, opening

OPS = {"open": opening, "close": closing, "erode": erosion, "dilate": dilation}
CV2_OPS = {
    "open": cv2.MORPH_OPEN,
    "close": cv2.MORPH_CLOSE,
    "erode": cv2.MORPH_ERODE,
    "dilate": cv2.MORPH_DILATE,
}
KORNIA_OPS = {
    "open": kornia.morphology.opening,
    "close": kornia.morphology.closing,
    "erode": kornia.morphology.erosion,
    "dilate": kornia.morphology.dilation,
}


def cv2_ref(mask: np.ndarray, op: str, k: int) -> np.ndarray:
    """Per image (H, W) bool -> bool with OpenCV's default border."""
    out = cv2.morphologyEx(mask.astype(np.uint8), CV2_OPS[op], np.ones((k, k), np.uint8))
    return out.astype(bool)


def kornia_ref(mask: torch.Tensor, op: str, k: int) -> torch.Tensor:
    """(B, 1, H, W) bool -> bool with kornia's default (geodesic) border."""
    out = KORNIA_OPS[op](mask.double(), torch.ones(k, k, dtype=torch.float64))
    return out > 0.5


def fill_ref(mask: np.ndarray) -> np.ndarray:
    return ndi.binary_fill_holes(mask)


def random_masks(seed, b, h, w, p=0.5):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, h, w, generator=g) < p


SHAPES = [(1, 1), (1, 2), (2, 1), (1, 17), (17, 1), (2, 2), (3, 3), (4, 6), (7, 5), (31, 40)]


# ----------------------------------------------------------------------------------------
# opening / closing / erosion / dilation
# ----------------------------------------------------------------------------------------


def test_smoke(device):
    m = random_masks(0, 2, 8, 9).to(device)
    for fn in OPS.values():
        out = fn(m, 3)
        assert out.shape == m.shape and out.dtype == torch.bool and out.device == m.device
        out3 = fn(m[:, 0], 3)
        assert out3.shape == (2, 8, 9)
        assert torch.equal(out3, out[:, 0])


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("k", [1, 3, 5, 7, 9, 15])
@pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
def test_random_vs_cv2_and_kornia(op, k, p, device):
    for i, (h, w) in enumerate(SHAPES):
        m = random_masks(100 * k + i, 3, h, w, p)
        out = OPS[op](m.to(device), k).cpu()
        expected_cv2 = np.stack([cv2_ref(x[0].numpy(), op, k) for x in m])[:, None]
        np.testing.assert_array_equal(out.numpy(), expected_cv2, err_msg=f"{op} k={k} {h}x{w}")
        assert torch.equal(out, kornia_ref(m, op, k)), f"kornia {op} k={k} {h}x{w}"


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("fill", [True, False])
def test_constant_masks(op, k, fill):
    for h, w in SHAPES:
        m = torch.full((1, 1, h, w), fill)
        out = OPS[op](m, k)
        np.testing.assert_array_equal(out[0, 0].numpy(), cv2_ref(m[0, 0].numpy(), op, k))
        # With the outside ignored, constant masks are fixed points of every operation.
        assert torch.equal(out, m)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("k", [3, 5])
def test_border_touching_shapes(op, k):
    h, w = 12, 15
    masks = []
    m = np.zeros((h, w), bool)
    m[:4, :] = True  # band on the top edge
    masks.append(m)
    m = np.zeros((h, w), bool)
    m[:, -2:] = True  # thin band on the right edge
    masks.append(m)
    m = np.zeros((h, w), bool)
    m[:3, :3] = True  # corner block
    m[-1, -1] = True  # single corner pixel
    masks.append(m)
    m = np.ones((h, w), bool)
    m[5, 7] = False  # pinhole
    m[0, 5] = False  # notch on the edge
    masks.append(m)
    m = np.zeros((h, w), bool)
    m[0, :] = True
    m[:, 0] = True  # one-pixel L along two edges
    masks.append(m)
    batch = torch.from_numpy(np.stack(masks))[:, None]
    out = OPS[op](batch, k)
    expected = np.stack([cv2_ref(x, op, k) for x in masks])[:, None]
    np.testing.assert_array_equal(out.numpy(), expected)
    assert torch.equal(out, kornia_ref(batch, op, k))


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    k=st.sampled_from([3, 5, 7]),
    op=st.sampled_from(sorted(OPS)),
    seed=st.integers(0, 2**31 - 1),
    p=st.floats(0.05, 0.95),
)
def test_property_vs_cv2(h, w, k, op, seed, p):
    m = np.random.default_rng(seed).random((h, w)) < p
    out = OPS[op](torch.from_numpy(m)[None, None], k)[0, 0].numpy()
    np.testing.assert_array_equal(out, cv2_ref(m, op, k))


def test_ksize_zero_is_identity_copy():
    m = random_masks(3, 2, 5, 6)
    for fn in OPS.values():
        out = fn(m, 0)
        assert torch.equal(out, m)
        assert out.data_ptr() != m.data_ptr()


def test_batch_equals_per_image(device):
    m = random_masks(4, 5, 20, 23).to(device)
    for fn in OPS.values():
        batched = fn(m, 5)
        single = torch.cat([fn(m[i : i + 1], 5) for i in range(m.shape[0])])
        assert torch.equal(batched, single)


def test_scripted_equals_eager(device):
    m = random_masks(5, 3, 17, 11).to(device)
    for fn in OPS.values():
        scripted = torch.jit.script(fn)
        for k in (0, 3, 7):
            assert torch.equal(scripted(m, k), fn(m, k))


@pytest.mark.parametrize("shape", [(0, 1, 5, 5), (2, 1, 0, 5), (2, 1, 5, 0), (0, 4, 4)])
def test_empty(shape, device):
    m = torch.zeros(shape, dtype=torch.bool, device=device)
    for fn in [*OPS.values(), fill_holes]:
        out = fn(m, 3) if fn is not fill_holes else fn(m)
        assert out.shape == m.shape and out.dtype == torch.bool


def test_exceptions():
    m = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    for fn in OPS.values():
        with pytest.raises(TypeError, match=r"mask must be a bool tensor, got torch\.float32"):
            fn(m.float(), 3)
        with pytest.raises(ValueError, match="ksize must be 0 or an odd integer >= 1, got 4"):
            fn(m, 4)
        with pytest.raises(ValueError, match="ksize must be 0 or an odd integer >= 1, got -3"):
            fn(m, -3)
        with pytest.raises(ValueError, match=r"mask must have shape \(B, 1, H, W\)"):
            fn(torch.zeros(1, 2, 4, 4, dtype=torch.bool), 3)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        fill_holes(m.to(torch.uint8))
    with pytest.raises(ValueError, match="mask must have shape"):
        fill_holes(torch.zeros(4, 4, dtype=torch.bool))


# ----------------------------------------------------------------------------------------
# fill_holes
# ----------------------------------------------------------------------------------------


def _ring(h, w, cy, cx, r_out, r_in):
    yy, xx = np.mgrid[:h, :w]
    d2 = (yy - cy) ** 2 + (xx - cx) ** 2
    return (d2 <= r_out**2) & (d2 > r_in**2)


def _spiral(n):
    m = np.zeros((n, n), bool)
    top, left, bottom, right = 0, 0, n - 1, n - 1
    while top <= bottom and left <= right:
        m[top, left : right + 1] = True
        m[top : bottom + 1, right] = True
        m[bottom, left : right + 1] = True
        m[top + 2 : bottom + 1, left] = True
        top, left, bottom, right = top + 2, left + 2, bottom - 2, right - 2
    return m


def _fill_cases():
    h, w = 32, 36
    cases = {}
    cases["ring"] = _ring(h, w, 16, 18, 10, 6)
    nested = _ring(h, w, 16, 18, 14, 12) | _ring(h, w, 16, 18, 8, 6) | _ring(h, w, 16, 18, 2, 0)
    cases["nested_rings"] = nested
    cases["spiral"] = np.pad(_spiral(29), ((1, 2), (3, 4)))
    edge = np.zeros((h, w), bool)
    edge[0:8, 0:8] = True
    edge[0:5, 2:5] = False  # opening onto the top border: not a hole
    edge[20:30, 20:30] = True
    edge[22:28, 22:28] = False  # a real hole
    cases["hole_touching_border"] = edge
    diag = np.zeros((h, w), bool)
    for i in range(10):
        diag[5 + i, 5 + i] = True
        diag[5 + i, 14 - i] = True
    diag[5, 5:15] = True
    diag[14, 5:15] = True
    cases["diagonal_walls"] = diag  # 8-connected walls leak for 4-connected background
    rng = np.random.default_rng(7)
    for p in (0.3, 0.5, 0.6, 0.7):
        cases[f"random_{p}"] = rng.random((h, w)) < p
    cases["all_ones"] = np.ones((h, w), bool)
    cases["all_zeros"] = np.zeros((h, w), bool)
    return cases


FILL_CASES = _fill_cases()


@pytest.mark.parametrize("name", list(FILL_CASES))
def test_fill_holes_vs_scipy(name, device):
    m = FILL_CASES[name]
    out = fill_holes(torch.from_numpy(m)[None, None].to(device))[0, 0].cpu().numpy()
    np.testing.assert_array_equal(out, fill_ref(m))


def test_fill_holes_batched_vs_scipy(device):
    masks = np.stack(list(FILL_CASES.values()))
    out = fill_holes(torch.from_numpy(masks).to(device)).cpu().numpy()
    expected = np.stack([fill_ref(m) for m in masks])
    np.testing.assert_array_equal(out, expected)
    # (B, 1, H, W) in, same shape out, and batch == per image
    b1 = torch.from_numpy(masks)[:, None].to(device)
    single = torch.cat([fill_holes(b1[i : i + 1]) for i in range(b1.shape[0])])
    assert torch.equal(fill_holes(b1), single)


def test_fill_holes_small_shapes():
    rng = np.random.default_rng(11)
    for h, w in [*SHAPES, (3, 40), (40, 3)]:
        for p in (0.4, 0.7, 0.9):
            m = rng.random((h, w)) < p
            out = fill_holes(torch.from_numpy(m)[None])[0].numpy()
            np.testing.assert_array_equal(out, fill_ref(m), err_msg=f"{h}x{w} p={p}")


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 14), w=st.integers(1, 14), seed=st.integers(0, 2**31 - 1))
def test_fill_holes_property(h, w, seed):
    m = np.random.default_rng(seed).random((h, w)) < 0.65
    out = fill_holes(torch.from_numpy(m)[None, None])[0, 0].numpy()
    np.testing.assert_array_equal(out, fill_ref(m))


def test_fill_holes_scripted_equals_eager(device):
    masks = torch.from_numpy(np.stack(list(FILL_CASES.values())))[:, None].to(device)
    scripted = torch.jit.script(fill_holes)
    assert torch.equal(scripted(masks), fill_holes(masks))


def test_fill_holes_random_batches_vs_scipy(device):
    rng = np.random.default_rng(5)
    randoms = rng.random((6, 40, 52)) < np.linspace(0.3, 0.9, 6)[:, None, None]
    x = torch.from_numpy(randoms).to(device)
    out = fill_holes(x)
    np.testing.assert_array_equal(out.cpu().numpy(), np.stack([fill_ref(m) for m in randoms]))
    assert torch.equal(torch.jit.script(fill_holes)(x), out)


@pytest.mark.parametrize("op", list(OPS))
def test_huge_ksize_is_clamped_and_fast(op):
    import time

    m = random_masks(3, 2, 4, 4)
    start = time.perf_counter()
    out = OPS[op](m, 100000001)
    assert time.perf_counter() - start < 1.0
    # Any square wider than twice the image is equivalent: compare with OpenCV at 2*4+1.
    expected = np.stack([cv2_ref(x[0].numpy(), op, 9) for x in m])[:, None]
    np.testing.assert_array_equal(out.numpy(), expected)
    expected_big = np.stack([cv2_ref(x[0].numpy(), op, 31) for x in m])[:, None]
    np.testing.assert_array_equal(out.numpy(), expected_big)
