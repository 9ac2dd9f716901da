import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tests._shapes import adversarial_masks, checkerboard, serpentine, smooth_blobs, spiral
from torchdefects.components import connected_components

STRUCTURE = {4: None, 8: np.ones((3, 3), dtype=int)}


def scipy_label(mask: np.ndarray, connectivity: int):
    labels, n = ndi.label(mask, structure=STRUCTURE[connectivity])
    return labels.astype(np.int32), n


def assert_matches_scipy(masks: np.ndarray, connectivity: int, device: str = "cpu"):
    labels, counts = connected_components(torch.from_numpy(masks).to(device), connectivity)
    assert labels.dtype == torch.int32 and counts.dtype == torch.int64
    assert labels.shape == masks.shape and counts.shape == (masks.shape[0],)
    labels, counts = labels.cpu().numpy(), counts.cpu().numpy()
    for i, mask in enumerate(masks):
        ref, n = scipy_label(mask, connectivity)
        assert counts[i] == n
        np.testing.assert_array_equal(labels[i], ref)


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.3, 0.5, 0.59, 0.7, 0.95, 1.0])
def test_random_masks_match_scipy(device, connectivity, density):
    rng = np.random.default_rng(int(density * 100) + connectivity)
    masks = rng.random((3, 48, 61)) < density
    assert_matches_scipy(masks, connectivity, device)


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("name_mask", list(adversarial_masks()), ids=lambda p: p[0])
def test_adversarial_masks_match_scipy(device, connectivity, name_mask):
    _, mask = name_mask
    assert_matches_scipy(mask[None], connectivity, device)


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("frac", [0.3, 0.6, 0.9])
def test_large_blobs_match_scipy(device, connectivity, frac):
    # Many foreground pixels in few long runs: runs are looked up by binary search
    # instead of through a painted map of run ids.
    rng = np.random.default_rng(int(frac * 10))
    masks = np.stack([smooth_blobs(rng, 192, 256, frac) for _ in range(2)])
    assert_matches_scipy(masks, connectivity, device)


def test_checkerboard_connectivity_differs():
    mask = torch.from_numpy(checkerboard(6, 6))[None]
    _, c4 = connected_components(mask, 4)
    _, c8 = connected_components(mask, 8)
    assert c4.item() == 18 and c8.item() == 1


def test_long_components_are_one_component():
    # kornia's fixed-iteration labeling splits components longer than its iteration count.
    line = torch.ones(1, 1, 1, 1000, dtype=torch.bool)
    _, counts = connected_components(line)
    assert counts.tolist() == [1]
    mask = np.stack([spiral(201)])
    _, counts = connected_components(torch.from_numpy(mask), 4)
    assert counts.tolist() == [scipy_label(mask[0], 4)[1]] == [1]
    s = serpentine(301, 300)
    _, counts = connected_components(torch.from_numpy(s[None]), 8)
    assert counts.tolist() == [1]


@pytest.mark.parametrize("connectivity", [4, 8])
def test_batch_equals_per_image_in_any_position(connectivity):
    rng = np.random.default_rng(3)
    masks = [rng.random((32, 40)) < d for d in (0.1, 0.5, 0.59, 0.0, 1.0)]
    batch = torch.from_numpy(np.stack(masks))
    labels, counts = connected_components(batch, connectivity)
    for i, m in enumerate(masks):
        one, n = connected_components(torch.from_numpy(m)[None], connectivity)
        assert torch.equal(labels[i], one[0]) and counts[i] == n[0]
    # Reversed batch: every image gets the same labels at its new position.
    rev_labels, rev_counts = connected_components(batch.flip(0), connectivity)
    assert torch.equal(rev_labels, labels.flip(0)) and torch.equal(rev_counts, counts.flip(0))


def test_accepts_b1hw_and_any_dtype():
    rng = np.random.default_rng(5)
    m = rng.random((2, 20, 30)) < 0.4
    ref, _ = connected_components(torch.from_numpy(m))
    for x in (
        torch.from_numpy(m).to(torch.uint8) * 7,
        torch.from_numpy(m).float() * -0.5,
        torch.from_numpy(m).to(torch.int64),
    ):
        labels, _ = connected_components(x)
        assert torch.equal(labels, ref)
    labels4, _ = connected_components(torch.from_numpy(m)[:, None])
    assert labels4.shape == (2, 1, 20, 30)
    assert torch.equal(labels4[:, 0], ref)


@pytest.mark.parametrize("shape", [(0, 5, 5), (2, 0, 5), (2, 5, 0), (0, 1, 0, 0)])
def test_empty_shapes(device, shape):
    labels, counts = connected_components(torch.ones(shape, dtype=torch.bool, device=device))
    assert labels.shape == shape and labels.dtype == torch.int32
    assert counts.shape == (shape[0],) and counts.sum().item() == 0


def test_bad_input_messages():
    expected = r"mask must have shape \(B, 1, H, W\) or \(B, H, W\), got \[4, 4\]"
    with pytest.raises(ValueError, match=expected):
        connected_components(torch.ones(4, 4))
    with pytest.raises(ValueError, match=r"got \[1, 2, 4, 4\]"):
        connected_components(torch.ones(1, 2, 4, 4))
    with pytest.raises(ValueError, match=r"got \[1, 1, 1, 4, 4\]"):
        connected_components(torch.ones(1, 1, 1, 4, 4))
    with pytest.raises(ValueError, match="connectivity must be 4 or 8, got 6"):
        connected_components(torch.ones(1, 4, 4), connectivity=6)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_scripted_equals_eager(device, connectivity):
    scripted = torch.jit.script(connected_components)
    rng = np.random.default_rng(11)
    for mask in [rng.random((3, 33, 47)) < 0.5, spiral(41)[None], np.zeros((2, 3, 3), bool)]:
        x = torch.from_numpy(mask).to(device)
        a = connected_components(x, connectivity)
        b = scripted(x, connectivity)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_deterministic_repeat(device):
    x = torch.from_numpy(np.random.default_rng(2).random((4, 64, 64)) < 0.59).to(device)
    first = connected_components(x)
    for _ in range(3):
        again = connected_components(x)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
@pytest.mark.parametrize("connectivity", [4, 8])
def test_cuda_equals_cpu(connectivity):
    x = torch.from_numpy(np.random.default_rng(9).random((5, 128, 96)) < 0.59)
    a = connected_components(x, connectivity)
    b = connected_components(x.cuda(), connectivity)
    assert torch.equal(a[0], b[0].cpu()) and torch.equal(a[1], b[1].cpu())


@settings(max_examples=150, deadline=None)
@given(
    masks=hnp.arrays(
        dtype=bool,
        shape=hnp.array_shapes(min_dims=3, max_dims=3, min_side=1, max_side=12),
    ),
    connectivity=st.sampled_from([4, 8]),
)
def test_property_matches_scipy(masks, connectivity):
    assert_matches_scipy(masks, connectivity)
