import cv2
import numpy as np
import pytest
import torch

from tests._shapes import adversarial_masks, smooth_blobs
from torchdefects import connected_components, region_stats
from torchdefects.shape import shape_stats, solidity


def cv2_solidity(component: np.ndarray) -> float:
    """pyimgano's rule: external contour (SIMPLE), its hull, contourArea of both; NaN for 0."""
    contours, _ = cv2.findContours(
        component.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    contour = max(contours, key=cv2.contourArea)
    hull_area = cv2.contourArea(cv2.convexHull(contour))
    return cv2.contourArea(contour) / hull_area if hull_area > 0 else float("nan")


def cv2_shape(component: np.ndarray):
    stats = cv2.connectedComponentsWithStats(component.astype(np.uint8), connectivity=8)[2]
    w, h, a = stats[1, cv2.CC_STAT_WIDTH], stats[1, cv2.CC_STAT_HEIGHT], stats[1, cv2.CC_STAT_AREA]
    return w * h, a / (w * h), max(w / h, h / w)


def masks():
    rng = np.random.default_rng(3)
    yield from adversarial_masks()
    for i in range(40):
        h, w = rng.integers(1, 30, 2)
        yield f"random{i}", rng.random((h, w)) < rng.random()
    for i in range(5):
        yield f"blobs{i}", smooth_blobs(rng, 48, 64, 0.3)
    yield "ring", np.pad(np.ones((5, 5), bool), 2) ^ np.pad(np.ones((1, 1), bool), 4)
    yield "dot", np.ones((1, 1), bool)
    yield "row", np.ones((1, 9), bool)
    yield "diagonal", np.eye(7, dtype=bool)


@pytest.mark.parametrize("conn", [4, 8])
def test_against_opencv(conn, device):
    for name, m in masks():
        labels, counts = connected_components(torch.from_numpy(m)[None].to(device), conn)
        regions = region_stats(labels, counts)
        stats = shape_stats(regions)
        sol = solidity(labels, regions).cpu().numpy()
        lab = labels[0].cpu().numpy()
        for i in range(regions.area.shape[0]):
            comp = lab == int(regions.label[i])
            ba, fr, ar = cv2_shape(comp)
            assert int(stats.bbox_area[i]) == ba
            assert abs(float(stats.fill_ratio[i]) - fr) <= 1e-12
            assert abs(float(stats.aspect_ratio[i]) - ar) <= 1e-12
            ref = cv2_solidity(comp)
            if np.isnan(ref):
                assert np.isnan(sol[i]), name
            else:
                assert abs(sol[i] - ref) <= 1e-12, (name, sol[i], ref)


def test_nested_regions_and_holes():
    # A ring with a dot inside its hole: the ring's contour ignores the hole and the dot.
    m = np.zeros((9, 9), bool)
    m[1:8, 1:8] = True
    m[2:7, 2:7] = False
    m[4, 4] = True
    labels, counts = connected_components(torch.from_numpy(m)[None], 8)
    regions = region_stats(labels, counts)
    sol = solidity(labels, regions)
    assert sol[0] == 1.0 and torch.isnan(sol[1])


def test_chunks_batch_subset():
    rng = np.random.default_rng(5)
    m = torch.from_numpy(np.stack([smooth_blobs(rng, 40, 50, 0.3) for _ in range(3)]))
    labels, counts = connected_components(m, 8)
    regions = region_stats(labels, counts)
    full = solidity(labels, regions)
    torch.testing.assert_close(
        solidity(labels, regions, chunk=1), full, equal_nan=True, rtol=0, atol=0
    )
    torch.testing.assert_close(
        solidity(labels.unsqueeze(1), regions, chunk=3), full, equal_nan=True
    )
    # Per image equals batched.
    for b in range(3):
        lb, cb = connected_components(m[b : b + 1], 8)
        per = solidity(lb, region_stats(lb, cb))
        torch.testing.assert_close(
            per, full[regions.batch_index == b], equal_nan=True, rtol=0, atol=0
        )


def test_empty_script_errors():
    labels, counts = connected_components(torch.zeros(2, 5, 5, dtype=torch.bool))
    regions = region_stats(labels, counts)
    assert solidity(labels, regions).shape == (0,)
    s = shape_stats(regions)
    assert s.bbox_area.shape == (0,) and s.fill_ratio.dtype == torch.float64
    scripted = torch.jit.script(shape_stats)
    m = torch.rand(2, 9, 9) < 0.4
    labels, counts = connected_components(m)
    regions = region_stats(labels, counts)
    for a, b in zip(scripted(regions), shape_stats(regions)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="chunk must be an integer >= 1"):
        solidity(labels, regions, chunk=0)
