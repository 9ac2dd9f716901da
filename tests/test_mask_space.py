"""``mask_space`` (pyimgano's): ``"full"`` exports the whole map's mask, regions stay ROI-gated.

Oracle: ``full_reference``, the head's stages per image with NumPy, OpenCV and SciPy and no ROI
(border: NumPy slicing; smoothing: ``cv2.GaussianBlur`` / ``medianBlur`` / ``blur``;
hysteresis: ``scipy.ndimage.label`` of ``map >= low`` plus a per-component seed check; open and
close: ``cv2.morphologyEx``; holes: ``scipy.ndimage.binary_fill_holes``; dilation:
``cv2.dilate`` with ``MORPH_ELLIPSE``; components: ``scipy.ndimage.label``; solidity: OpenCV's
``findContours`` + ``convexHull``), then pyimgano's per-component filters (``min_area``, scores,
fill ratio, aspect ratio, solidity; not ``max_regions`` nor the quantile). Everything but the
mask is compared with the ``"roi"`` head, which tests/test_head.py checks against its own
oracle.
"""

import json

import cv2
import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from tests.test_head import realistic_maps, ref_roi
from tests.test_toolbox_pipeline import _smooth, _solidity
from torchdefects import DefectHead, DefectsConfig, extract_defects

THR = 0.6
#: Cuts several blobs of ``realistic_maps`` (48 x 64) at its edges.
ROI = [0.3, 0.25, 0.8, 0.9]

CASES = [
    dict(open_ksize=3, close_ksize=3, fill_holes=True, min_area=4, max_regions=3),
    dict(close_ksize=5, fill_holes=True, connectivity=4, min_area=2),
    dict(open_ksize=3, mask_dilate_ksize=4, min_area=6, max_regions=2),
    dict(hysteresis_enabled=True, hysteresis_low=0.45, close_ksize=3, min_area=3),
    dict(
        border_ignore_px=3,
        map_smoothing_method="box",  # bit-equal to cv2.blur, so the oracle is exact
        map_smoothing_ksize=5,
        fill_holes=True,
        min_score_max=0.68,
        min_score_mean=0.6,
        max_regions=4,
    ),
    dict(
        map_smoothing_method="median",
        map_smoothing_ksize=3,
        min_fill_ratio=0.45,
        max_aspect_ratio=2.5,
        merge_nearby_enabled=True,
        merge_nearby_max_gap_px=3,
        min_score_max_quantile=0.5,
        max_regions_sort_by="area",
    ),
    dict(open_ksize=3, fill_holes=True, min_solidity=0.85, min_area=3),
    dict(fill_holes=True),  # no component filter: the full mask is the morphology's output
]
SCRIPTABLE = [c for c in CASES if c.get("min_solidity") is None]


def _cfg(kw, mask_space="full", roi=ROI):
    return DefectsConfig(
        pixel_threshold=THR, roi_xyxy_norm=roi, mask_space=mask_space, **{"connectivity": 8, **kw}
    )


def _maps(seed, b=4, h=48, w=64):
    return torch.from_numpy(realistic_maps(b, h, w, seed))[:, None]


def full_reference(m, cfg, thr):
    """One image (H, W): the full mask with NumPy, OpenCV and SciPy (module docstring)."""
    dt = np.float64 if m.dtype == np.float64 else np.float32
    v = m.astype(dt)
    n = cfg.border_ignore_px
    if n > 0:
        v = np.zeros_like(v) if 2 * n >= v.shape[0] or 2 * n >= v.shape[1] else v.copy()
        v[:n], v[-n:], v[:, :n], v[:, -n:] = 0, 0, 0, 0
    v = _smooth(v, cfg.map_smoothing_method, cfg.map_smoothing_ksize, cfg.map_smoothing_sigma)
    ok = ~np.isnan(v)
    if v.size == 0:
        return ok
    structure = np.ones((3, 3)) if cfg.connectivity == 8 else None
    if cfg.hysteresis_enabled:
        hi = cfg.hysteresis_high if cfg.hysteresis_high is not None else thr
        lo = cfg.hysteresis_low if cfg.hysteresis_low is not None else hi * 0.5
        lo, hi = min(lo, hi), max(lo, hi)
        lab, _ = ndi.label(v >= dt(lo), structure=structure)
        seeds = np.unique(lab[v >= dt(hi)])
        mask = np.isin(lab, seeds[seeds != 0])
    else:
        mask = v >= dt(thr)
    for k, op in ((cfg.open_ksize, cv2.MORPH_OPEN), (cfg.close_ksize, cv2.MORPH_CLOSE)):
        if k:
            mask = cv2.morphologyEx(mask.astype(np.uint8), op, np.ones((k, k), np.uint8))
            mask = mask.astype(bool) & ok
    if cfg.fill_holes:
        mask = ndi.binary_fill_holes(mask) & ok
    k = cfg.mask_dilate_ksize
    if k:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
        mask = cv2.dilate(mask.astype(np.uint8), kernel).astype(bool) & ok
    lab, count = ndi.label(mask, structure=structure)
    out = np.zeros_like(mask)
    for i in range(1, count + 1):
        comp = lab == i
        ys, xs = np.nonzero(comp)
        area, vals = len(ys), v[comp]
        bw, bh = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        if area < cfg.min_area:
            continue
        if cfg.min_score_max is not None and vals.max() < cfg.min_score_max:
            continue
        if cfg.min_score_mean is not None and vals.astype(np.float64).mean() < cfg.min_score_mean:
            continue
        if cfg.min_fill_ratio is not None and area / (bw * bh) < cfg.min_fill_ratio:
            continue
        if cfg.max_aspect_ratio is not None and max(bw / bh, bh / bw) > cfg.max_aspect_ratio:
            continue
        if cfg.min_solidity is not None:
            s = _solidity(comp)
            if s is None or s < cfg.min_solidity:
                continue
        out |= comp
    return out


def _check(out, roi_out, maps, cfg):
    """``out.mask`` is the oracle's full mask; everything else is the ``"roi"`` head's."""
    for i in range(maps.shape[0]):
        want = full_reference(maps[i, 0].cpu().numpy(), cfg, THR)
        np.testing.assert_array_equal(out.mask[i, 0].cpu().numpy(), want, err_msg=f"image {i}")
    assert out.mask.dtype == torch.bool and out.mask.shape == roi_out.mask.shape
    for name in out._fields:
        if name in ("mask", "solidity", "merged_from"):
            continue
        a, b = getattr(out, name), getattr(roi_out, name)
        for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True, msg=name)
    assert torch.equal(roi_out.mask, roi_out.labels != 0)


@pytest.mark.parametrize("kw", CASES, ids=range(len(CASES)))
def test_full_mask_equals_oracle_and_regions_stay_roi_gated(kw, device):
    x = _maps(len(str(kw))).to(device)
    cfg = _cfg(kw)
    out = DefectHead(cfg).to(device)(x)
    roi_out = DefectHead(_cfg(kw, "roi")).to(device)(x)
    _check(out, roi_out, x, cfg)
    # The ROI really cuts: the full mask has pixels outside it, and differs from the roi mask.
    inside = torch.from_numpy(ref_roi(ROI, x.shape[2], x.shape[3])).to(device)
    assert bool((out.mask[:, 0] & ~inside).any())
    assert not bool((roi_out.mask[:, 0] & ~inside).any())
    assert int(roi_out.num_regions.sum()) > 0


@pytest.mark.parametrize("kw", CASES, ids=range(len(CASES)))
def test_without_roi_full_equals_roi_unless_a_region_is_capped(kw):
    x = _maps(len(str(kw)) + 1)
    kw_all = {k: v for k, v in kw.items() if k not in ("max_regions", "min_score_max_quantile")}
    full = DefectHead(_cfg(kw_all, roi=None))(x)
    roi = DefectHead(_cfg(kw_all, "roi", roi=None))(x)
    assert torch.equal(full.mask, roi.mask) and int(roi.num_regions.sum()) > 0
    _check(full, roi, x, _cfg(kw_all, roi=None))
    # max_regions (and the quantile) trim the reported regions, never the full mask.
    kw_cap = dict(kw_all, max_regions=1)
    if "min_score_max_quantile" in kw:
        kw_cap["min_score_max_quantile"] = kw["min_score_max_quantile"]
    full_c = DefectHead(_cfg(kw_cap, roi=None))(x)
    roi_c = DefectHead(_cfg(kw_cap, "roi", roi=None))(x)
    assert torch.equal(full_c.mask, full.mask)
    assert torch.equal(roi_c.mask, roi_c.labels != 0) and int(roi_c.num_regions.max()) == 1
    assert int(roi_c.mask.sum()) < int(full_c.mask.sum())


def test_full_mask_with_max_regions_keeps_every_component():
    m = np.zeros((1, 1, 12, 20), np.float32)
    m[0, 0, 2:5, 2:5] = 0.9  # inside the ROI, the best region
    m[0, 0, 7:10, 3:6] = 0.8  # inside the ROI, capped by max_regions=1
    m[0, 0, 4:7, 15:19] = 0.95  # outside the ROI, the highest score of the map
    m[0, 0, 0, 12] = 0.99  # one pixel outside: below min_area=2 in both masks
    x = torch.from_numpy(m)
    kw = dict(min_area=2, max_regions=1)
    roi = [0.0, 0.0, 0.5, 1.0]
    out = DefectHead(_cfg(kw, roi=roi))(x)
    want = np.zeros((12, 20), bool)
    want[2:5, 2:5] = want[7:10, 3:6] = want[4:7, 15:19] = True
    np.testing.assert_array_equal(out.mask[0, 0].numpy(), want)
    assert out.num_regions.tolist() == [1] and out.regions.bbox_xyxy.tolist() == [[2, 2, 4, 4]]
    assert out.labels[0, 0].ne(0).sum().item() == 9


def test_straddling_region_is_whole_in_the_full_mask_and_cut_in_the_regions():
    m = np.zeros((1, 1, 10, 10), np.float32)
    m[0, 0, 3:7, 2:8] = 0.9  # columns 2..7; the ROI keeps columns 0..4
    x = torch.from_numpy(m)
    out = DefectHead(_cfg(dict(min_area=13), roi=[0.0, 0.0, 0.5, 1.0]))(x)
    # 24 pixels pass min_area=13 in the full mask; the 12 inside the ROI do not as a region.
    assert int(out.mask.sum()) == 24 and out.num_regions.tolist() == [0]
    out = DefectHead(_cfg(dict(min_area=12), roi=[0.0, 0.0, 0.5, 1.0]))(x)
    assert int(out.mask.sum()) == 24 and out.regions.area.tolist() == [12]


def test_nan_pixels_are_never_foreground_in_the_full_mask(device):
    x = _maps(3)
    x[0, 0, 10:20, 5:60:3] = float("nan")  # stripes a closing would bridge
    x[1, 0, 20:24, 30:34] = float("nan")  # a hole in a blob after filling
    x[2, 0] = float("nan")
    x = x.to(device)
    for kw in (dict(close_ksize=5, fill_holes=True), dict(mask_dilate_ksize=5, min_area=2)):
        cfg = _cfg(kw)
        out = DefectHead(cfg).to(device)(x)
        assert not bool((out.mask & torch.isnan(x)).any())
        assert not bool(out.mask[2].any())
        _check(out, DefectHead(_cfg(kw, "roi")).to(device)(x), x, cfg)


@pytest.mark.parametrize(
    "shape",
    [(1, 1, 1, 17), (1, 1, 17, 1), (2, 1, 1, 1), (1, 1, 0, 5), (0, 1, 6, 6), (2, 1, 9, 9)],
)
def test_adversarial_shapes_and_patterns(shape):
    kw = dict(close_ksize=3, fill_holes=True, min_area=2)
    for pattern in ("ones", "checker", "spiral", "zeros"):
        m = np.zeros(shape, np.float32)
        if m.size:
            h, w = shape[2], shape[3]
            yy, xx = np.mgrid[:h, :w]
            m[:, 0] = {
                "ones": np.ones((h, w)),
                "checker": (yy + xx) % 2,
                "spiral": (np.minimum(np.minimum(yy, h - 1 - yy), np.minimum(xx, w - 1 - xx)) % 2),
                "zeros": np.zeros((h, w)),
            }[pattern]
        x = torch.from_numpy(m)
        for roi in (ROI, [0.0, 0.0, 0.0, 0.0]):  # an ROI, and an empty one
            cfg = _cfg(kw, roi=roi)
            out = DefectHead(cfg)(x)
            _check(out, DefectHead(_cfg(kw, "roi", roi=roi))(x), x, cfg)
            if roi == [0.0, 0.0, 0.0, 0.0]:
                assert out.num_regions.sum() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_maps(dtype):
    kw = dict(CASES[4], map_smoothing_method="none")
    x = _maps(21).to(dtype)
    cfg = _cfg(kw)
    out = DefectHead(cfg)(x)
    # float16/bfloat16 compare in float32 (binarize's rule): the oracle gets the exact values.
    _check(out, DefectHead(_cfg(kw, "roi"))(x), x.float(), cfg)
    assert bool((out.mask != (out.labels != 0)).any())


def test_float64_map_compares_in_float64():
    x = torch.full((1, 1, 4, 6), 0.6, dtype=torch.float64)
    x[0, 0, :, :3] = np.nextafter(0.6, 0)  # below 0.6 in float64, 0.6 in float32
    out = DefectHead(_cfg({}, roi=[0.0, 0.0, 0.25, 1.0]))(x)
    assert out.mask[0, 0].tolist() == [[False] * 3 + [True] * 3] * 4


@pytest.mark.parametrize("kw", CASES, ids=range(len(CASES)))
def test_batch_equals_per_image(kw):
    x = _maps(len(str(kw)) + 2)
    head = DefectHead(_cfg(kw))
    full = head(x)
    for i in range(x.shape[0]):
        assert torch.equal(head(x[i : i + 1]).mask, full.mask[i : i + 1]), i


@pytest.mark.parametrize("kw", SCRIPTABLE, ids=range(len(SCRIPTABLE)))
def test_scripted_equals_eager(kw, device):
    x = _maps(len(str(kw)) + 3).to(device)
    head = DefectHead(_cfg(kw)).to(device)
    eager, scripted = head(x), torch.jit.script(head)(x)
    assert torch.equal(eager.mask, scripted.mask) and torch.equal(eager.labels, scripted.labels)
    assert bool((eager.mask != (eager.labels != 0)).any())


def test_roi_head_graph_has_no_full_mask_branch():
    # mask_space "roi" costs nothing: the Final flag removes the branch from the graph.
    roi = torch.jit.script(DefectHead(_cfg(CASES[0], "roi")))
    full = torch.jit.script(DefectHead(_cfg(CASES[0])))
    assert "_full_mask" not in roi._run.code and "_full_mask" in full._run.code


def test_static_head_refuses_full():
    with pytest.raises(ValueError, match="is not supported in exported heads") as e:
        DefectHead(_cfg(dict(max_regions=3)), static_output=True)
    assert str(e.value).startswith('mask_space="full"') and 'set it to "roi"' in str(e.value)
    DefectHead(_cfg(dict(max_regions=3), "roi"), static_output=True)  # roi still builds


def test_config_and_extract_defects_accept_full():
    from torchdefects.config import UNSUPPORTED_UNTIL_IMPLEMENTED, load_config

    assert "mask_space" not in UNSUPPORTED_UNTIL_IMPLEMENTED
    assert load_config({"defects": {"mask_space": "full"}}).mask_space == "full"
    m = _maps(9, b=1)[0, 0].numpy()
    out = extract_defects(m, pixel_threshold=THR, roi_xyxy_norm=ROI, mask_space="full")
    cfg = _cfg({})
    np.testing.assert_array_equal(out["mask"], full_reference(m, cfg, THR).astype(np.uint8) * 255)
    roi = extract_defects(m, pixel_threshold=THR, roi_xyxy_norm=ROI)
    assert out["regions"] == roi["regions"] and not np.array_equal(out["mask"], roi["mask"])


def test_run_writes_the_full_mask(tmp_path):
    from PIL import Image

    from torchdefects.cli import main
    from torchdefects.overlay import render_record

    maps = tmp_path / "maps"
    maps.mkdir()
    x = _maps(11, b=3)
    for i in range(3):
        np.save(maps / f"m{i}.npy", x[i, 0].numpy())
    kw = dict(close_ksize=3, fill_holes=True, min_area=3, max_regions=2)
    roi_flag = ["--roi-xyxy-norm", *(str(v) for v in ROI)]
    base = ["run", "--maps", str(maps), "--quiet", "--pixel-threshold", str(THR),
            "--defect-close-ksize", "3", "--defect-fill-holes", "--defect-min-area", "3",
            "--defect-max-regions", "2", *roi_flag, "--save-masks", "png",
            "--save-overlays"]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / "full"), "--defects-mask-space", "full"]) == 0
    assert main([*base, "--out", str(tmp_path / "roi")]) == 0

    def recs(name):
        with open(tmp_path / name / "results.jsonl", encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    cfg = _cfg(kw)
    for i, (rf, rr) in enumerate(zip(recs("full"), recs("roi"))):
        blk = rf["defects"]["mask"]
        assert blk["mask_space"] == "full" and rr["defects"]["mask"]["mask_space"] == "roi"
        png = np.asarray(Image.open(tmp_path / "full" / blk["path"]))
        want = full_reference(x[i, 0].numpy(), cfg, THR)
        np.testing.assert_array_equal(png, want.astype(np.uint8) * 255)
        roi_png = np.asarray(Image.open(tmp_path / "roi" / rr["defects"]["mask"]["path"]))
        assert not np.array_equal(png, roi_png)
        # Records (regions, decisions) are the same ROI-gated ones.
        assert rf["defects"]["regions"] == rr["defects"]["regions"]
        assert (rf["label"], rf["score"]) == (rr["label"], rr["score"])
        # The overlay outlines the full mask.
        pic = np.asarray(Image.open(tmp_path / "full" / "overlays" / f"m{i}.npy.png"))
        drawn = render_record(rf, anomaly_map=x[i, 0].numpy(), mask=want)
        np.testing.assert_array_equal(pic, np.asarray(drawn))
        roi_pic = np.asarray(Image.open(tmp_path / "roi" / "overlays" / f"m{i}.npy.png"))
        assert not np.array_equal(pic, roi_pic)
    # The same from a config file's mask_space; the flag wins over it.
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"defects": {"mask_space": "full", "pixel_threshold": THR, **kw}}))
    cbase = ["run", "--maps", str(maps), "--quiet", "--config", str(conf), *roi_flag,
             "--save-masks", "npy"]  # fmt: skip
    assert main([*cbase, "--out", str(tmp_path / "cf")]) == 0
    assert main([*cbase, "--out", str(tmp_path / "cr"), "--defects-mask-space", "roi"]) == 0
    for i, (rc, rr) in enumerate(zip(recs("cf"), recs("cr"))):
        assert rc["defects"]["mask"]["mask_space"] == "full"
        got = np.load(tmp_path / "cf" / rc["defects"]["mask"]["path"])
        np.testing.assert_array_equal(got, full_reference(x[i, 0].numpy(), cfg, THR) * 255)
        assert rr["defects"]["mask"]["mask_space"] == "roi"
        assert rc["defects"]["regions"] == rr["defects"]["regions"]
