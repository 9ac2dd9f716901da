import cv2
import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from tests._shapes import adversarial_masks
from torchdefects.components import connected_components
from torchdefects.regions import Regions, region_stats, select_regions

STRUCTURE = {4: None, 8: np.ones((3, 3), dtype=int)}


def reference_regions(masks: np.ndarray, maps: np.ndarray, connectivity: int):
    """Per region, in (image, scipy label) order: OpenCV stats, SciPy scores."""
    rows = []
    for b, (mask, amap) in enumerate(zip(masks, maps)):
        labels, n = ndi.label(mask, structure=STRUCTURE[connectivity])
        _, cv_labels, stats, centroids = cv2.connectedComponentsWithStats(
            mask.astype(np.uint8), connectivity=connectivity
        )
        for label in range(1, n + 1):
            y, x = np.argwhere(labels == label)[0]
            c = cv_labels[y, x]  # OpenCV numbers components in its own order
            np.testing.assert_array_equal(cv_labels == c, labels == label)
            left, top, width, height, area = stats[c]
            rows.append(
                dict(
                    batch_index=b,
                    label=label,
                    area=area,
                    bbox=[left, top, left + width - 1, top + height - 1],
                    centroid=centroids[c],
                    score_max=ndi.maximum(amap, labels, label),
                    score_mean=ndi.mean(amap.astype(np.float64), labels, label),
                )
            )
    return rows


def assert_regions_match(regions: Regions, rows, exact_scores=True):
    assert regions.area.shape == (len(rows),)
    r = Regions(*(t.cpu() for t in regions))
    assert r.batch_index.tolist() == [row["batch_index"] for row in rows]
    assert r.label.tolist() == [row["label"] for row in rows]
    assert r.area.tolist() == [row["area"] for row in rows]
    assert r.bbox_xyxy.tolist() == [row["bbox"] for row in rows]
    if rows:
        np.testing.assert_allclose(
            r.centroid_xy.numpy(), np.stack([row["centroid"] for row in rows]), rtol=0, atol=1e-9
        )
        ref_max = np.array([row["score_max"] for row in rows], dtype=np.float32)
        np.testing.assert_array_equal(r.score_max.numpy(), ref_max)
        ref_mean = np.array([row["score_mean"] for row in rows])
        np.testing.assert_allclose(r.score_mean.numpy(), ref_mean, rtol=1e-6, atol=0)


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("density", [0.02, 0.3, 0.59, 0.9])
def test_random_stats_match_opencv_and_scipy(device, connectivity, density):
    rng = np.random.default_rng(int(density * 100))
    masks = rng.random((3, 40, 52)) < density
    maps = rng.random((3, 40, 52)).astype(np.float32)
    labels, counts = connected_components(torch.from_numpy(masks).to(device), connectivity)
    regions = region_stats(labels, counts, torch.from_numpy(maps).to(device))
    assert regions.centroid_xy.dtype == torch.float64
    assert regions.score_max.dtype == torch.float32
    assert_regions_match(regions, reference_regions(masks, maps, connectivity))


@pytest.mark.parametrize("name_mask", list(adversarial_masks()), ids=lambda p: p[0])
def test_adversarial_stats(device, name_mask):
    _, mask = name_mask
    rng = np.random.default_rng(0)
    amap = rng.standard_normal(mask.shape).astype(np.float32)
    labels, counts = connected_components(torch.from_numpy(mask[None]).to(device))
    regions = region_stats(labels, counts, torch.from_numpy(amap[None]).to(device))
    assert_regions_match(regions, reference_regions(mask[None], amap[None], 8))


def test_without_map_scores_are_nan():
    mask = torch.zeros(2, 5, 5, dtype=torch.bool)
    mask[0, 1:3, 1:3] = True
    mask[1, 4, :] = True
    labels, counts = connected_components(mask)
    regions = region_stats(labels, counts)
    assert regions.area.tolist() == [4, 5]
    assert regions.batch_index.tolist() == [0, 1]
    assert torch.isnan(regions.score_max).all() and torch.isnan(regions.score_mean).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_map_dtypes(dtype):
    rng = np.random.default_rng(4)
    mask = rng.random((2, 30, 30)) < 0.4
    amap = torch.from_numpy(rng.random((2, 30, 30))).to(dtype)
    labels, counts = connected_components(torch.from_numpy(mask))
    regions = region_stats(labels, counts, amap)
    expected = torch.float64 if dtype == torch.float64 else torch.float32
    assert regions.score_max.dtype == expected and regions.score_mean.dtype == expected
    rows = reference_regions(mask, amap.double().numpy(), 8)
    np.testing.assert_array_equal(
        regions.score_max.double().numpy(), np.array([r["score_max"] for r in rows])
    )


def test_empty_batch_and_no_regions(device):
    for shape in [(0, 4, 4), (2, 0, 3), (2, 4, 4)]:
        labels, counts = connected_components(torch.zeros(shape, dtype=torch.bool, device=device))
        regions = region_stats(labels, counts, torch.zeros(shape, device=device))
        assert all(t.shape[0] == 0 for t in regions)
        assert regions.bbox_xyxy.shape == (0, 4) and regions.centroid_xy.shape == (0, 2)


def test_bad_inputs():
    labels = torch.zeros(2, 4, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"counts must have shape \(2,\)"):
        region_stats(labels, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"anomaly_map must have the shape of labels \[2, 4, 4\]"):
        region_stats(labels, torch.zeros(2, dtype=torch.int64), torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match=r"labels must have shape"):
        region_stats(torch.zeros(4, 4), torch.zeros(1, dtype=torch.int64))
    labels[0, 0, 0] = 3
    with pytest.raises(ValueError, match="larger than counts"):
        region_stats(labels, torch.tensor([1, 0]))


def test_batch_equals_per_image():
    rng = np.random.default_rng(8)
    masks = rng.random((4, 25, 31)) < 0.45
    maps = torch.from_numpy(rng.random((4, 25, 31)).astype(np.float32))
    labels, counts = connected_components(torch.from_numpy(masks))
    batch = region_stats(labels, counts, maps)
    for i in range(4):
        one = region_stats(labels[i : i + 1], counts[i : i + 1], maps[i : i + 1])
        sel = batch.batch_index == i
        for field, a, b in zip(Regions._fields, batch, one):
            if field == "batch_index":
                continue
            assert torch.equal(a[sel], b), field  # bit-identical whatever the position


def test_scripted_equals_eager():
    rng = np.random.default_rng(1)
    masks = torch.from_numpy(rng.random((3, 30, 30)) < 0.5)
    maps = torch.from_numpy(rng.random((3, 30, 30)).astype(np.float32))
    labels, counts = connected_components(masks)
    eager = region_stats(labels, counts, maps)
    scripted = torch.jit.script(region_stats)(labels, counts, maps)
    for a, b in zip(eager, scripted):
        assert torch.equal(a, b)
    sel = torch.jit.script(select_regions)(labels, eager, 3, 4, 2)
    ref = select_regions(labels, eager, 3, 4, 2)
    assert torch.equal(sel[0], ref[0]) and torch.equal(sel[2], ref[2])
    for a, b in zip(sel[1], ref[1]):
        assert torch.equal(a, b)


def reference_select(rows, num_images, min_area, max_regions):
    out = []
    for b in range(num_images):
        mine = [r for r in rows if r["batch_index"] == b and r["area"] >= min_area]
        mine.sort(key=lambda r: (-r["score_max"], -r["area"], r["label"]))
        out.extend(mine if max_regions is None else mine[:max_regions])
    return out


@pytest.mark.parametrize(
    "min_area,max_regions", [(0, None), (3, None), (0, 1), (5, 3), (10**6, None)]
)
def test_select_regions_matches_reference(device, min_area, max_regions):
    rng = np.random.default_rng(min_area + (max_regions or 0))
    masks = rng.random((3, 30, 40)) < 0.35
    # Quantized scores make ties, so area and label order matter.
    maps = (rng.integers(0, 4, (3, 30, 40)) / 4).astype(np.float32)
    labels, counts = connected_components(torch.from_numpy(masks).to(device))
    regions = region_stats(labels, counts, torch.from_numpy(maps).to(device))
    kept_labels, kept, num = select_regions(labels, regions, 3, min_area, max_regions)
    rows = reference_select(reference_regions(masks, maps, 8), 3, min_area, max_regions)
    assert_regions_match(kept, rows)
    assert num.tolist() == [sum(r["batch_index"] == b for r in rows) for b in range(3)]
    # The label map holds exactly the kept regions, with their numbers.
    full = labels.cpu().numpy()
    for b in range(3):
        keep = [r["label"] for r in rows if r["batch_index"] == b]
        expected = np.where(np.isin(full[b], keep), full[b], 0)
        np.testing.assert_array_equal(kept_labels[b].cpu().numpy(), expected)


def test_select_regions_without_scores_sorts_by_area():
    mask = torch.zeros(1, 6, 12, dtype=torch.bool)
    mask[0, 0, 0:2] = True  # label 1, area 2
    mask[0, 0, 4:9] = True  # label 2, area 5
    mask[0, 3, 0:2] = True  # label 3, area 2
    labels, counts = connected_components(mask)
    _, kept, num = select_regions(labels, region_stats(labels, counts), 1)
    assert kept.label.tolist() == [2, 1, 3] and num.tolist() == [3]


def test_select_regions_bad_arguments():
    labels, counts = connected_components(torch.ones(1, 3, 3))
    regions = region_stats(labels, counts)
    with pytest.raises(ValueError, match="min_area must be an integer >= 0, got -1"):
        select_regions(labels, regions, 1, min_area=-1)
    with pytest.raises(ValueError, match="max_regions must be an integer >= 1 or None, got 0"):
        select_regions(labels, regions, 1, max_regions=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_bit_identical_to_cpu():
    rng = np.random.default_rng(12)
    masks = torch.from_numpy(rng.random((5, 96, 80)) < 0.4)
    maps = torch.from_numpy(rng.standard_normal((5, 96, 80)).astype(np.float32))
    on = {}
    for device in ("cpu", "cuda"):
        labels, counts = connected_components(masks.to(device))
        regions = region_stats(labels, counts, maps.to(device))
        kept = select_regions(labels, regions, 5, min_area=3, max_regions=7)
        on[device] = (labels, counts, *regions, kept[0], *kept[1], kept[2])
    for a, b in zip(on["cpu"], on["cuda"]):
        assert torch.equal(a, b.cpu())


def test_nan_pixels_are_ignored_and_scores_never_nan():
    mask = torch.zeros(1, 4, 6, dtype=torch.bool)
    mask[0, 0, 0:3] = True  # region 1: one NaN pixel among 0.2, 0.4
    mask[0, 3, 4:6] = True  # region 2: all NaN
    amap = torch.zeros(1, 4, 6)
    amap[0, 0, :3] = torch.tensor([0.2, float("nan"), 0.4])
    amap[0, 3, 4:6] = float("nan")
    labels, counts = connected_components(mask)
    regions = region_stats(labels, counts, amap)
    ref = reference_regions(mask.numpy(), np.nan_to_num(amap.numpy(), nan=-np.inf), 8)
    assert regions.score_max.tolist()[0] == pytest.approx(0.4)
    expected = (np.float64(np.float32(0.2)) + np.float64(np.float32(0.4))) / 2
    assert regions.score_mean.tolist()[0] == pytest.approx(expected)
    assert regions.score_max[1] == float("-inf") and regions.score_mean[1] == float("-inf")
    assert not torch.isnan(regions.score_max).any() and not torch.isnan(regions.score_mean).any()
    assert regions.area.tolist() == [r["area"] for r in ref]
    # A NaN never outranks a real score: with max_regions=1 the 0.4 region is kept.
    _, kept, _ = select_regions(labels, regions, 1, max_regions=1)
    assert kept.label.tolist() == [1]


def test_nan_map_random_matches_nan_aware_reference():
    rng = np.random.default_rng(21)
    masks = rng.random((2, 30, 30)) < 0.5
    maps = rng.random((2, 30, 30)).astype(np.float32)
    maps[rng.random((2, 30, 30)) < 0.2] = np.nan
    labels, counts = connected_components(torch.from_numpy(masks))
    regions = region_stats(labels, counts, torch.from_numpy(maps))
    for r, bi, lab in zip(range(len(regions.label)), regions.batch_index, regions.label):
        ref_labels, _ = ndi.label(masks[bi], structure=np.ones((3, 3)))
        vals = maps[bi][ref_labels == int(lab)]
        vals = vals[~np.isnan(vals)]
        exp_max = vals.max() if vals.size else -np.inf
        exp_mean = vals.astype(np.float64).mean() if vals.size else -np.inf
        assert regions.score_max[r].item() == exp_max
        np.testing.assert_allclose(regions.score_mean[r].item(), exp_mean, rtol=1e-6)


def _fused_cases():
    rng = np.random.default_rng(21)
    for density in (0.02, 0.3, 0.59, 0.9):
        yield f"random{density}", rng.random((3, 29, 37)) < density
    for name, mask in adversarial_masks():
        yield name, mask[None]
    yield "empty_batch_image", np.stack([np.zeros((9, 7), bool), rng.random((9, 7)) < 0.5])


def assert_same_regions(a: Regions, b: Regions):
    for field, x, y in zip(Regions._fields, a, b):
        assert x.dtype == y.dtype and x.shape == y.shape, field
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True, msg=field)


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("name_mask", list(_fused_cases()), ids=lambda p: p[0])
def test_fused_labeling_and_stats_equal_the_public_functions(device, connectivity, name_mask):
    # The head's path (_label_regions, one run listing) against connected_components +
    # region_stats, whose oracles are SciPy and OpenCV above: bit-equal, with and without
    # a map, with NaN pixels, eager and scripted.
    from torchdefects.regions import _label_regions

    _, masks = name_mask
    rng = np.random.default_rng(5)
    maps = rng.random(masks.shape).astype(np.float32)
    maps[rng.random(masks.shape) < 0.1] = np.nan
    mask_t = torch.from_numpy(masks).to(device)[:, None]
    map_t = torch.from_numpy(maps).to(device)[:, None]
    labels, counts = connected_components(mask_t, connectivity)
    scripted = torch.jit.script(_label_regions)
    for amap in (map_t, None):
        ref = region_stats(labels, counts, amap)
        for fn in (_label_regions, scripted):
            got_labels, got_counts, got = fn(mask_t, connectivity, amap)
            assert torch.equal(got_labels, labels) and torch.equal(got_counts, counts)
            assert_same_regions(got, ref)


def test_fused_labeling_bad_inputs():
    from torchdefects.regions import _label_regions

    with pytest.raises(ValueError, match="connectivity"):
        _label_regions(torch.ones(1, 3, 3, dtype=torch.bool), 6)
    with pytest.raises(ValueError, match="anomaly_map"):
        _label_regions(torch.ones(1, 3, 3, dtype=torch.bool), 8, torch.zeros(1, 3, 4))
    with pytest.raises(ValueError, match="mask"):
        _label_regions(torch.ones(1, 2, 3, 3, dtype=torch.bool), 8)
    labels, counts, regions = _label_regions(torch.zeros(0, 1, 4, 4, dtype=torch.bool))
    assert labels.shape == (0, 1, 4, 4) and counts.shape == (0,) and regions.area.numel() == 0
