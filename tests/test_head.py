import copy
import math

import cv2
import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from torchdefects.config import DefectsConfig
from torchdefects.head import DefectHead, Defects

# ----------------------------------------------------------------------------------------
# Realistic maps and the NumPy / OpenCV / SciPy reference pipeline
# ----------------------------------------------------------------------------------------


def realistic_maps(b, h, w, seed=0):
    """Smooth noise in [0, 0.5] plus Gaussian blobs and rings (defects leaving holes)."""
    rng = np.random.default_rng(seed)
    out = np.empty((b, h, w), np.float32)
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    for i in range(b):
        base = ndi.gaussian_filter(rng.random((h, w)), sigma=3)
        base = (base - base.min()) / max(np.ptp(base), 1e-9) * 0.5
        for _ in range(rng.integers(2, 6)):
            cy, cx = rng.random() * h, rng.random() * w
            s = 1.0 + rng.random() * max(h, w) / 12
            base += rng.uniform(0.3, 0.6) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.random() * h, rng.random() * w
            r = 3 + rng.random() * max(h, w) / 8
            d = np.hypot(yy - cy, xx - cx)
            base += rng.uniform(0.4, 0.6) * np.exp(-((d - r) ** 2) / 2.0)
        out[i] = base
    return out


def ref_roi(roi, h, w):
    inside = np.ones((h, w), bool)
    if roi is None:
        return inside
    v = [min(max(float(x), 0.0), 1.0) for x in roi]
    x1, x2 = min(v[0], v[2]), max(v[0], v[2])
    y1, y2 = min(v[1], v[3]), max(v[1], v[3])
    inside[:] = False
    inside[math.floor(y1 * h) : math.ceil(y2 * h), math.floor(x1 * w) : math.ceil(x2 * w)] = True
    return inside


def reference(m, cfg, thr):
    """One image (H, W): the pipeline with NumPy, OpenCV and SciPy."""
    h, w = m.shape
    dt = np.float64 if m.dtype == np.float64 else np.float32
    v = m.astype(dt)
    inside = ref_roi(cfg.roi_xyxy_norm, h, w)
    allowed = inside & ~np.isnan(v)  # the head's rule: NaN is never foreground
    mask = (v >= dt(thr)) & inside
    if cfg.open_ksize:
        k = np.ones((cfg.open_ksize,) * 2, np.uint8)
        mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, k).astype(bool)
    if cfg.close_ksize:
        k = np.ones((cfg.close_ksize,) * 2, np.uint8)
        mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, k).astype(bool)
        mask &= allowed
    if cfg.fill_holes:
        mask = ndi.binary_fill_holes(mask) & allowed
    structure = np.ones((3, 3)) if cfg.connectivity == 8 else None
    lab, n = ndi.label(mask, structure=structure)
    regions = []
    for label in range(1, n + 1):
        ys, xs = np.nonzero(lab == label)
        if len(ys) < cfg.min_area:
            continue
        vals = v[ys, xs]
        regions.append(
            dict(
                label=label,
                area=len(ys),
                bbox=[xs.min(), ys.min(), xs.max(), ys.max()],
                centroid=[xs.mean(), ys.mean()],
                score_max=vals.max(),
                score_mean=vals.astype(np.float64).mean(),
            )
        )
    regions.sort(key=lambda r: (-r["score_max"], -r["area"], r["label"]))
    if cfg.max_regions is not None:
        regions = regions[: cfg.max_regions]
    kept = np.isin(lab, [r["label"] for r in regions])
    labels = np.where(kept, lab, 0)
    roi_vals = v[inside].astype(np.float64)
    roi_vals = roi_vals[~np.isnan(roi_vals)]
    roi_max = roi_vals.max() if roi_vals.size else np.nan
    roi_mean = roi_vals.mean() if roi_vals.size else np.nan
    return labels, regions, roi_max, roi_mean


def assert_matches_reference(out, maps, cfg, thresholds):
    assert isinstance(out, tuple) and out._fields == Defects._fields
    b = maps.shape[0]
    assert out.mask.dtype == torch.bool and out.mask.shape == (b, 1, *maps.shape[1:])
    assert out.labels.dtype == torch.int32 and out.labels.shape == out.mask.shape
    assert out.num_regions.dtype == torch.int64 and out.num_regions.shape == (b,)
    assert out.roi_max.dtype == torch.float32 and out.roi_mean.dtype == torch.float32
    assert out.pixel_threshold.dtype == torch.float32 and out.pixel_threshold.shape == (b,)
    r = out.regions
    got = {k: getattr(r, k).cpu().numpy() for k in r._fields}
    start = 0
    for i in range(b):
        labels, regions, roi_max, roi_mean = reference(maps[i], cfg, thresholds[i])
        msg = f"image {i} cfg {cfg}"
        np.testing.assert_array_equal(out.labels[i, 0].cpu().numpy(), labels, err_msg=msg)
        np.testing.assert_array_equal(out.mask[i, 0].cpu().numpy(), labels != 0, err_msg=msg)
        assert out.num_regions[i].item() == len(regions), msg
        sl = slice(start, start + len(regions))
        start += len(regions)
        assert (got["batch_index"][sl] == i).all(), msg
        np.testing.assert_array_equal(got["label"][sl], [x["label"] for x in regions], msg)
        np.testing.assert_array_equal(got["area"][sl], [x["area"] for x in regions], msg)
        np.testing.assert_array_equal(
            got["bbox_xyxy"][sl].reshape(-1, 4), np.reshape([x["bbox"] for x in regions], (-1, 4))
        )
        np.testing.assert_allclose(
            got["centroid_xy"][sl].reshape(-1, 2),
            np.reshape([x["centroid"] for x in regions], (-1, 2)),
            rtol=1e-12,
        )
        np.testing.assert_array_equal(got["score_max"][sl], [x["score_max"] for x in regions])
        np.testing.assert_allclose(
            got["score_mean"][sl], [x["score_mean"] for x in regions], rtol=2e-6
        )
        np.testing.assert_array_equal(out.roi_max[i].item(), np.float32(roi_max), msg)
        np.testing.assert_allclose(out.roi_mean[i].item(), roi_mean, rtol=2e-6, err_msg=msg)
        assert out.pixel_threshold[i].item() == np.float32(thresholds[i])
        # no detector score: the image score is roi_max; the label is "any region reported"
        np.testing.assert_array_equal(out.image_score[i].item(), np.float32(roi_max), msg)
        assert out.image_label[i].item() == int(len(regions) > 0), msg
    assert out.image_score.dtype == torch.float32 and out.image_label.dtype == torch.int64
    assert start == got["label"].shape[0]


# Each stage on and off, ROIs off-centre and reversed, max_regions 1, threshold 0, both
# connectivities.
CONFIGS = [
    dict(),
    dict(open_ksize=3),
    dict(close_ksize=3),
    dict(fill_holes=True),
    dict(min_area=10),
    dict(max_regions=1),
    dict(connectivity=4),
    dict(open_ksize=3, close_ksize=3, fill_holes=True, min_area=10),
    dict(open_ksize=3, close_ksize=5, fill_holes=True, connectivity=4, max_regions=2),
    dict(open_ksize=5, close_ksize=3, min_area=5, max_regions=3),
    dict(roi_xyxy_norm=[0.1, 0.3, 0.65, 0.95]),
    dict(roi_xyxy_norm=[0.9, 0.8, 0.2, 0.05], close_ksize=5, fill_holes=True),  # reversed
    dict(roi_xyxy_norm=[0.0, 0.0, 0.97, 1.0], close_ksize=7),  # closing reaches the border
    dict(roi_xyxy_norm=[-0.2, 0.25, 0.6, 1.3], open_ksize=3, close_ksize=3, fill_holes=True),
    dict(pixel_threshold=0.0),
    dict(pixel_threshold=0.0, roi_xyxy_norm=[0.3, 0.2, 0.7, 0.6], fill_holes=True),
    dict(pixel_threshold=0.45, fill_holes=True, connectivity=4, min_area=3),
    dict(pixel_threshold=0.7, close_ksize=9, fill_holes=True, max_regions=1, connectivity=4),
]


@pytest.fixture(scope="module")
def maps():
    return realistic_maps(4, 48, 56, seed=1)


def _cfg(overrides):
    kw = dict(pixel_threshold=0.55)
    kw.update(overrides)
    return DefectsConfig(**kw)


@pytest.mark.parametrize("overrides", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_vs_reference(overrides, maps, device):
    cfg = _cfg(overrides)
    head = DefectHead(cfg).to(device)
    out = head(torch.from_numpy(maps).to(device)[:, None])
    assert_matches_reference(out, maps, cfg, [cfg.pixel_threshold] * maps.shape[0])
    assert out.num_regions.sum() > 0 or cfg.pixel_threshold > 0.6


def test_scripted_equals_eager(maps, device):
    x = torch.from_numpy(maps).to(device)
    for overrides in CONFIGS[::2] + [CONFIGS[11]]:
        head = DefectHead(_cfg(overrides)).to(device)
        scripted = torch.jit.script(head)
        assert_defects_equal(scripted(x), head(x))
        thr = torch.tensor([0.5, 0.6, 0.4, 0.7], device=device)
        assert_defects_equal(scripted(x, thr), head(x, thr))


def assert_defects_equal(a, b):
    assert len(a) == len(b)
    for name, x, y in zip(Defects._fields, a, b):
        if name == "regions":
            for f, u, v in zip(y._fields, x, y):
                assert u.dtype == v.dtype and torch.equal(u.nan_to_num(), v.nan_to_num()), f
        elif x is None or y is None:  # optional toolbox outputs (solidity, merged_from)
            assert x is None and y is None, name
        else:
            assert x.dtype == y.dtype, name
            assert torch.equal(x.nan_to_num(), y.nan_to_num()), name


def test_per_call_threshold(maps, device):
    cfg = _cfg(CONFIGS[7])
    head = DefectHead(cfg).to(device)
    x = torch.from_numpy(maps).to(device)
    thr = [0.5, 0.62, 0.4, 0.58]
    out = head(x, torch.tensor(thr, dtype=torch.float64, device=device))
    assert_matches_reference(out, maps, cfg, thr)
    # a scalar tensor for the whole batch overrides the config
    out = head(x, torch.tensor(0.48))
    assert_matches_reference(out, maps, cfg, [0.48] * 4)
    # no threshold in the config: per call only
    free = DefectHead(DefectsConfig(open_ksize=3)).to(device)
    out = free(x, torch.tensor(thr, device=device))
    assert_matches_reference(out, maps, free.config, np.float32(thr).tolist())
    with pytest.raises(ValueError, match="pixel_threshold must be given: the config has"):
        free(x)
    with pytest.raises(torch.jit.Error, match="pixel_threshold must be given"):
        torch.jit.script(free)(x)


def test_batch_equals_per_image(maps, device):
    head = DefectHead(_cfg(CONFIGS[8])).to(device)
    x = torch.from_numpy(maps).to(device)
    thr = torch.tensor([0.5, 0.62, 0.4, 0.58], device=device)
    batched = head(x, thr)
    singles = [head(x[i : i + 1], thr[i]) for i in range(4)]
    for name in ("mask", "labels", "num_regions", "roi_max", "roi_mean", "pixel_threshold"):
        cat = torch.cat([getattr(s, name) for s in singles])
        assert torch.equal(getattr(batched, name), cat), name
    for f in batched.regions._fields:
        cat = torch.cat([getattr(s.regions, f) for s in singles])
        if f == "batch_index":
            cat = torch.repeat_interleave(
                torch.arange(4, device=device), torch.stack([s.num_regions[0] for s in singles])
            )
        assert torch.equal(getattr(batched.regions, f), cat), f


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(dtype, maps, device):
    cfg = _cfg(CONFIGS[7])
    head = DefectHead(cfg).to(device)
    x = torch.from_numpy(maps).to(dtype)
    out = head(x.to(device))
    # float16/bfloat16 -> float32 is exact: the reference sees the same values
    ref_maps = x.double().numpy() if dtype == torch.float64 else x.float().numpy()
    assert_matches_reference(out, ref_maps, cfg, [cfg.pixel_threshold] * 4)
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.regions.score_max.dtype == want


def test_nan_and_inf_pixels(device):
    maps = realistic_maps(2, 24, 24, seed=5)
    maps[0, 3:6, 3:6] = np.nan
    maps[1, 10:12, 10:12] = np.inf
    maps[1, 0, :] = np.nan
    cfg = _cfg(dict(roi_xyxy_norm=[0.0, 0.0, 0.8, 0.8], min_area=2))
    out = DefectHead(cfg).to(device)(torch.from_numpy(maps).to(device))
    assert_matches_reference(out, maps, cfg, [cfg.pixel_threshold] * 2)
    assert out.mask[1, 0, 10, 10]
    allnan = np.full((1, 5, 5), np.nan, np.float32)
    out = DefectHead(cfg)(torch.from_numpy(allnan))
    assert out.roi_max.isnan().all() and out.roi_mean.isnan().all()
    assert out.num_regions.tolist() == [0]


def test_roi_outside_never_foreground(maps):
    roi = [0.2, 0.1, 0.97, 0.999]
    cfg = DefectsConfig(pixel_threshold=-1.0, roi_xyxy_norm=roi, close_ksize=9, fill_holes=True)
    out = DefectHead(cfg)(torch.from_numpy(maps))
    inside = torch.from_numpy(ref_roi(roi, *maps.shape[1:]))
    assert torch.equal(out.mask, inside.expand_as(out.mask))


def test_shapes_and_module_state(maps):
    cfg = _cfg(dict(roi_xyxy_norm=[0.1, 0.2, 0.3, 0.4]))
    head = DefectHead(cfg)
    x = torch.from_numpy(maps)
    assert_defects_equal(head(x), head(x[:, None]))
    state = head.state_dict()
    assert set(state) == {"threshold", "roi"}
    assert state["threshold"].dtype == torch.float64 and state["threshold"].item() == 0.55
    assert state["roi"].tolist() == [0.1, 0.2, 0.3, 0.4]
    # a dtype cast of the module keeps the exact threshold and ROI
    half = DefectHead(cfg).half()
    assert half.threshold.dtype == torch.float64 and half.threshold.item() == 0.55
    assert_defects_equal(half(x), head(x))
    # later edits to the caller's config do not reach the head
    cfg.open_ksize = 5
    assert head.open_ksize == 0 and head.config.open_ksize == 0


@pytest.mark.parametrize("shape", [(0, 1, 8, 8), (2, 1, 0, 8), (2, 1, 8, 0), (0, 8, 8)])
def test_empty(shape, device):
    head = DefectHead(_cfg(CONFIGS[7])).to(device)
    out = head(torch.zeros(shape, device=device))
    b = shape[0]
    assert out.mask.shape == (b, 1, *shape[-2:]) and out.labels.shape == out.mask.shape
    assert out.num_regions.shape == (b,) and out.regions.label.shape == (0,)
    assert out.roi_max.shape == (b,) and out.roi_max.isnan().all()
    assert out.pixel_threshold.shape == (b,)


def test_exceptions(maps):
    head = DefectHead(_cfg({}))
    x = torch.from_numpy(maps)
    with pytest.raises(TypeError, match="anomaly_map must be float16, bfloat16, float32 or"):
        head(x.to(torch.int64))
    with pytest.raises(ValueError, match=r"anomaly_map must have shape \(B, 1, H, W\)"):
        head(x[:, None].expand(4, 2, 48, 56))
    with pytest.raises(ValueError, match=r"pixel_threshold must be a scalar or have shape \(4,\)"):
        head(x, torch.rand(3))
    with pytest.raises(TypeError, match="pixel_threshold must be a real number tensor"):
        head(x, torch.tensor([True]))
    with pytest.raises(TypeError, match="config must be a DefectsConfig, got dict"):
        DefectHead({"pixel_threshold": 0.5})


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_cuda_bit_identical_to_cpu():
    maps = torch.from_numpy(realistic_maps(6, 64, 72, seed=3))[:, None]
    cfg = DefectsConfig(
        pixel_threshold=0.55,
        roi_xyxy_norm=[0.05, 0.1, 0.95, 0.9],
        open_ksize=3,
        close_ksize=3,
        fill_holes=True,
        min_area=4,
        max_regions=5,
    )
    cpu = DefectHead(cfg)(maps)
    gpu = DefectHead(cfg).cuda()(maps.cuda())
    for name, a, b in zip(Defects._fields, cpu, gpu):
        if name == "regions":
            for x, y in zip(a, b):
                assert torch.equal(x, y.cpu()), name
        elif a is None or b is None:  # optional toolbox outputs
            assert a is None and b is None, name
        else:
            assert torch.equal(a, b.cpu()), name


# ----------------------------------------------------------------------------------------
# NaN never foreground, image score and label, static output, arguments
# ----------------------------------------------------------------------------------------


def nan_maps():
    """Adversarial NaN placements: inside a ring (a hole), in a one-pixel gap that a closing
    bridges, on a blob, at the border, a whole NaN row, plus random NaN over realistic maps."""
    m = np.zeros((4, 24, 30), np.float32)
    m[0, 4:11, 4:11] = 0.9  # a ring with a NaN hole
    m[0, 6:9, 6:9] = 0.1
    m[0, 7, 7] = np.nan
    m[1, 5:10, 3:8] = 0.95  # two blobs, the closing bridges a NaN gap
    m[1, 5:10, 9:14] = 0.8
    m[1, 5:10, 8] = np.nan
    m[2, :, :] = 0.9  # full map, NaN row and border pixels
    m[2, 12, :] = np.nan
    m[2, 0, 0] = np.nan
    m[3] = realistic_maps(1, 24, 30, seed=5)[0]
    rng = np.random.default_rng(0)
    m[3][rng.random((24, 30)) < 0.1] = np.nan
    return m


@pytest.mark.parametrize(
    "overrides",
    [
        dict(close_ksize=3),
        dict(close_ksize=5, fill_holes=True),
        dict(fill_holes=True),
        dict(open_ksize=3, close_ksize=3, fill_holes=True, max_regions=1),
        dict(close_ksize=3, fill_holes=True, roi_xyxy_norm=[0.0, 0.1, 0.8, 1.0]),
    ],
)
def test_nan_never_foreground(overrides, device):
    maps = nan_maps()
    cfg = _cfg(overrides)
    out = DefectHead(cfg).to(device)(torch.from_numpy(maps).to(device))
    assert_matches_reference(out, maps, cfg, [cfg.pixel_threshold] * 4)
    assert not (out.mask[:, 0].cpu() & torch.from_numpy(np.isnan(maps))).any()
    assert not out.regions.score_max.isnan().any() and not out.regions.score_mean.isnan().any()
    # the bridged gap would otherwise give one region holding a NaN pixel
    if overrides.get("close_ksize") == 3 and len(overrides) == 1:
        assert out.num_regions[1].item() == 2


def test_image_score_and_label(maps, device):
    x = torch.from_numpy(maps).to(device)
    plain = DefectHead(_cfg(dict(min_area=10))).to(device)(x)
    assert torch.equal(plain.image_score, plain.roi_max)
    assert torch.equal(plain.image_label, (plain.num_regions > 0).long())
    assert plain.image_label.sum() > 0
    # a configured image threshold decides on the image score (>= in float32, NaN never)
    cfg = _cfg(dict(min_area=10, image_threshold=0.9))
    head = DefectHead(cfg).to(device)
    out = head(x)
    want = [int(float(s) >= 0.9) for s in out.roi_max.cpu()]
    assert out.image_label.tolist() == want
    scores = torch.tensor([0.95, float("nan"), 0.9, 0.2], device=device)
    out = head(x, image_score=scores)
    assert out.image_score.dtype == torch.float32
    assert torch.equal(out.image_score.nan_to_num(-1), scores.nan_to_num(-1))
    assert out.image_label.tolist() == [1, 0, 1, 0]
    # float32(0.9) is below 0.9 in float64: the threshold is rounded to float32 too
    below = torch.tensor([np.nextafter(np.float32(0.9), np.float32(0))] * 4, device=device)
    assert head(x, image_score=below).image_label.tolist() == [0] * 4
    scripted = torch.jit.script(head)
    assert torch.equal(scripted(x, None, scores).image_label, out.image_label)
    with pytest.raises(ValueError, match=r"image_score must be a scalar or have shape \(4,\)"):
        head(x, image_score=torch.rand(3, device=device))
    with pytest.raises(TypeError, match=r"image_score must be a float tensor, got torch\.int64"):
        head(x, image_score=torch.ones(4, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"image_score must be a torch\.Tensor, got list"):
        head(x, image_score=[0.1, 0.2, 0.3, 0.4])


STATIC = dict(open_ksize=3, close_ksize=3, fill_holes=True, min_area=4, max_regions=3)


def assert_static_matches(static, flat, capacity):
    """Padded rows equal the flat regions in order; rows past num_regions are zero."""
    assert static.boxes.dtype == torch.int64 and static.area.dtype == torch.int64
    assert static.centroid.dtype == torch.float32 and static.score_max.dtype == torch.float32
    b = static.num_regions.shape[0]
    assert static.boxes.shape == (b, capacity, 4) and static.centroid.shape == (b, capacity, 2)
    for name in ("mask", "labels", "num_regions", "roi_max", "roi_mean", "image_score"):
        assert torch.equal(getattr(static, name).nan_to_num(), getattr(flat, name).nan_to_num())
    assert torch.equal(static.pixel_threshold_used, flat.pixel_threshold)
    assert torch.equal(static.image_label, flat.image_label)
    r = flat.regions
    start = 0
    for i in range(b):
        n = int(flat.num_regions[i])
        sl = slice(start, start + n)
        start += n
        assert torch.equal(static.boxes[i, :n], r.bbox_xyxy[sl])
        assert torch.equal(static.area[i, :n], r.area[sl])
        assert torch.equal(static.label[i, :n], r.label[sl])
        assert torch.equal(static.centroid[i, :n], r.centroid_xy[sl].float())
        assert torch.equal(static.score_max[i, :n], r.score_max[sl].float())
        assert torch.equal(static.score_mean[i, :n], r.score_mean[sl].float())
        for name in ("boxes", "area", "label", "centroid", "score_max", "score_mean"):
            assert (getattr(static, name)[i, n:] == 0).all(), name


def test_static_output(maps, device):
    cfg = _cfg(STATIC)
    x = torch.from_numpy(maps).to(device)
    flat = DefectHead(cfg).to(device)(x)
    head = DefectHead(cfg, static_output=True).to(device)
    assert isinstance(head, DefectHead) and type(head).__name__ == "StaticDefectHead"
    assert type(copy.deepcopy(head)) is type(head)  # __new__ keeps copy and pickle working
    out = head(x)
    assert type(out).__name__ == "StaticDefects"
    assert (flat.num_regions == 3).any() and (flat.num_regions < 3).any()  # full and padded
    assert_static_matches(out, flat, 3)
    # reference values for one image, straight from the NumPy / OpenCV / SciPy pipeline
    _, regions, _, _ = reference(maps[0], cfg, cfg.pixel_threshold)
    n = len(regions)
    np.testing.assert_array_equal(out.boxes[0, :n].cpu().numpy(), [r["bbox"] for r in regions])
    scripted = torch.jit.script(head)
    for a, b in zip(scripted(x), out):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())
    thr = torch.tensor([0.5, 0.6, 0.45, 0.7], device=device)
    assert_static_matches(scripted(x, thr), DefectHead(cfg).to(device)(x, thr), 3)
    # empty maps: every row is padding
    empty = head(torch.zeros(2, 1, 8, 9, device=device))
    assert (empty.num_regions == 0).all() and (empty.boxes == 0).all()


@pytest.mark.parametrize(
    "overrides",
    [STATIC, dict(max_regions=1), dict(max_regions=40, connectivity=4, fill_holes=True)]
    + [dict(CONFIGS[i], max_regions=CONFIGS[i].get("max_regions", 4)) for i in (8, 11, 14, 17)],
)
def test_static_traced_path_equals_eager(overrides, maps, device):
    """The forward torch.export / compile trace (fixed-size tables, K argmax rounds) against
    the eager one (flat regions, then padding) on realistic and NaN maps and a 2x3 map."""
    head = DefectHead(_cfg(overrides), static_output=True).to(device)
    for x in (torch.from_numpy(maps), torch.from_numpy(nan_maps()), torch.rand(2, 1, 2, 3)):
        x = x.to(device)
        want, got = head(x), head._forward_static(x)
        for name, a, b in zip(want._fields, want, got):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            if name in ("score_mean", "centroid"):  # sums in another order
                torch.testing.assert_close(b, a, rtol=1.2e-7, atol=0, equal_nan=True)
            else:
                assert torch.equal(a.nan_to_num(), b.nan_to_num()), name


def test_static_output_needs_max_regions():
    with pytest.raises(ValueError, match=r"static_output=True needs config\.max_regions"):
        DefectHead(DefectsConfig(pixel_threshold=0.5), static_output=True)
    with pytest.raises(TypeError, match="static_output must be True or False, got 1"):
        DefectHead(DefectsConfig(pixel_threshold=0.5, max_regions=2), static_output=1)


def test_python_number_threshold_and_numpy_input(maps):
    head = DefectHead(_cfg(STATIC))
    x = torch.from_numpy(maps)
    assert_defects_equal(head(x, 0.5), head(x, torch.tensor(0.5)))
    assert_defects_equal(head(x, 1), head(x, torch.tensor(1.0)))
    with pytest.raises(TypeError, match=r"anomaly_map must be a torch\.Tensor, got numpy\.ndarray"):
        head(maps)
    with pytest.raises(TypeError, match=r"convert it with torch\.from_numpy"):
        head(maps)
    with pytest.raises(TypeError, match=r"pixel_threshold must be a number or a torch\.Tensor"):
        head(x, "0.5")
    with pytest.raises(TypeError, match=r"pixel_threshold must be a number or a torch\.Tensor"):
        head(x, True)
    with pytest.raises(ValueError, match="pixel_threshold must be not NaN, got nan"):
        head(x, float("nan"))
    with pytest.raises(ValueError, match="pixel_threshold must be not NaN, got nan"):
        head(x, torch.tensor([0.5, float("nan"), 0.5, 0.5]))


@pytest.mark.slow
def test_torch_compile_cpu():
    """torch.compile traces the head (graph breaks at the data-dependent sizes) and gives the
    eager result; aot_eager, because Inductor's vectorized CPU kernels for padded bool masks
    do not build (scripts/repro_inductor_bool_pad.py)."""
    cfg = _cfg(STATIC)
    maps = torch.from_numpy(realistic_maps(2, 24, 28, seed=2))
    for static in (False, True):
        head = DefectHead(cfg, static_output=static)
        compiled = torch.compile(head, backend="aot_eager")
        got, want = compiled(maps), head(maps)
        if static:
            for a, b in zip(got, want):
                assert torch.equal(a.nan_to_num(), b.nan_to_num())
        else:
            assert_defects_equal(got, want)
    assert want.num_regions.sum() > 0
