"""torchdefects.overlay: colour scale, colour bar, outlines, ranked tags, banner, layout.

Expected colours are computed here from the palette anchors documented in
docs/outputs.md (not read from the module), by hand interpolation.
"""

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from PIL import Image

from torchdefects.overlay import (
    MapScale,
    heatmap,
    map_scale,
    mask_outline,
    render_overlay,
    render_record,
    scale_from_provenance,
)
from torchdefects.threshold import binarize

# The documented palette (docs/outputs.md), position on the scale -> RGB.
RECEDE = [(0.0, (10, 12, 20)), (0.25, (34, 40, 56)), (0.5, (80, 88, 108))]
ALARM = [
    (0.5, (214, 40, 40)),
    (0.65, (240, 100, 30)),
    (0.8, (252, 175, 40)),
    (0.92, (255, 230, 90)),
    (1.0, (255, 240, 140)),
]
DEFECT = (0, 229, 255)
OK_RGB, NG_RGB = (30, 140, 60), (200, 30, 30)


def _expected(value, lo, thr, hi):
    """Colour of ``value`` by hand: position on the piecewise scale, then the anchors."""
    if value >= thr:
        t = min(1.0, 0.5 + 0.5 * (value - thr) / (hi - thr))
        anchors = ALARM
    else:
        t = max(0.0, 0.5 * (value - lo) / (thr - lo))
        anchors = RECEDE
    for (p0, c0), (p1, c1) in zip(anchors, anchors[1:]):
        if p0 <= t <= p1:
            f = (t - p0) / (p1 - p0)
            return np.array([c0[i] + f * (c1[i] - c0[i]) for i in range(3)])
    raise AssertionError(t)


def _layout(pic):
    return pic.info["torchdefects.layout"]


# ----------------------------------------------------------------------------
# Plain heat map and outline (unchanged behaviour without a threshold)
# ----------------------------------------------------------------------------


def test_heatmap_without_threshold_monotone_brightness_and_range():
    a = np.linspace(0.0, 1.0, 256).reshape(16, 16)
    rgb = heatmap(a)
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
    lum = rgb.astype(float) @ [0.299, 0.587, 0.114]
    assert np.all(np.diff(lum.ravel()) >= -1e-9)  # dark -> bright
    assert lum.ravel()[0] < 10 and lum.ravel()[-1] > 200
    np.testing.assert_array_equal(heatmap(a, vmin=0.0, vmax=2.0)[-1, -1], heatmap(a)[8, 0])


def test_heatmap_nan_and_errors():
    a = np.full((4, 4), 3.0)
    a[0, 0] = np.nan
    assert (heatmap(a)[0, 0] == 0).all()
    assert (heatmap(a, threshold=1.0)[0, 0] == 0).all()
    with pytest.raises(ValueError, match=r"anomaly_map must have shape \(H, W\)"):
        heatmap(np.zeros((2, 2, 2)))
    with pytest.raises(TypeError, match="anomaly_map must hold real numbers"):
        heatmap(np.zeros((2, 2), bool))


def test_mask_outline_equals_erosion_oracle():
    rng = np.random.default_rng(0)
    m = ndi.binary_opening(rng.random((40, 50)) > 0.4)
    want = m & ~ndi.binary_erosion(m, structure=ndi.generate_binary_structure(2, 1), border_value=0)
    np.testing.assert_array_equal(mask_outline(m), want)
    assert not mask_outline(np.zeros((5, 5), bool)).any()


# ----------------------------------------------------------------------------
# The threshold-anchored scale
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_threshold_palette_at_fixed_points(dtype):
    lo, thr, hi = 0.0, 1.0, 3.0
    values = [-5.0, 0.0, 0.25, 0.5, 0.9, 0.999, 1.0, 1.3, 2.0, 2.7, 3.0, 10.0]
    a = np.array([values], dtype=dtype)
    got = heatmap(a, vmin=lo, vmax=hi, threshold=thr)[0].astype(float)
    for v, g in zip(values, got):
        np.testing.assert_allclose(g, _expected(v, lo, thr, hi), atol=1.0, err_msg=str(v))
    # The anchors themselves are exact.
    np.testing.assert_array_equal(got[1], RECEDE[0][1])
    np.testing.assert_array_equal(got[6], ALARM[0][1])
    np.testing.assert_array_equal(got[10], ALARM[-1][1])
    # Below recedes (dark, grey-blue), at/above alarms (warm, saturated).
    lum = got @ [0.299, 0.587, 0.114]
    below, above = got[:6], got[6:]
    assert (below[:, 2] >= below[:, 0]).all() and (above[:, 0] >= 214).all()
    assert lum[5] < 100 and np.all(np.diff(lum[:6]) >= 0) and np.all(np.diff(lum[6:]) >= 0)


def test_warm_pixels_are_exactly_the_heads_foreground():
    rng = np.random.default_rng(3)
    thr = 0.1  # not a float32 number: the map compares in float32, like the head
    for dtype in (np.float32, np.float64):
        a = (thr + rng.integers(-3, 4, size=(40, 40)) * np.float64(1e-9)).astype(dtype)
        a[0, :5] = np.float32(thr)
        rgb = heatmap(a, vmin=0.0, vmax=0.2, threshold=thr)
        want = binarize(torch.from_numpy(a)[None, None], thr)[0, 0].numpy()
        warm = rgb[..., 0] >= 200
        np.testing.assert_array_equal(warm, want)
        assert want.any() and not want.all()


def test_map_scale_rule_normal_map_is_not_a_blazing_field():
    thr = 0.627
    rng = np.random.default_rng(0)
    normal = rng.uniform(0.1, 0.6, size=(64, 64))
    normal[10, 10] = 0.641  # just above the threshold
    s = map_scale(normal, thr)
    assert s.lo == normal.min() and s.hi == pytest.approx(2 * thr - normal.min())
    pos_max = 0.5 + 0.5 * (0.641 - thr) / (s.hi - thr)
    assert 0.5 < pos_max < 0.53
    rgb = heatmap(normal, threshold=thr)
    lum = rgb.astype(float) @ [0.299, 0.587, 0.114]
    assert np.median(lum) < 60  # the field stays dark
    assert (rgb[..., 0] >= 200).sum() == 1  # one warm pixel, dark red (not yellow)
    assert rgb[10, 10, 1] < 60

    bad = normal.copy()
    bad[30:34, 30:34] = 2.49
    s = map_scale(bad, thr)
    assert s.hi == 2.49
    np.testing.assert_array_equal(heatmap(bad, threshold=thr)[31, 31], ALARM[-1][1])


def test_map_scale_given_ends_degenerate_maps_and_errors():
    assert map_scale(None, 1.0, 0.0, 5.0) == MapScale(0.0, 1.0, 5.0, "given")
    s = map_scale(np.full((3, 3), 2.0), 1.0)  # nothing below the threshold
    assert s.lo < 1.0 < s.hi and s.hi >= 2.0
    s = map_scale(np.full((3, 3), np.nan), 1.0)
    assert s.lo < 1.0 < s.hi
    s = map_scale(np.full((3, 3), 0.5), -2.0)
    assert s.lo < -2.0 < s.hi
    with pytest.raises(ValueError, match="lo < threshold < hi"):
        map_scale(None, 1.0, 2.0, 5.0)
    with pytest.raises(ValueError, match="threshold must be finite, got nan"):
        map_scale(None, float("nan"))
    with pytest.raises(TypeError, match="lo must be a number"):
        map_scale(None, 1.0, "0", 2.0)


def test_scale_from_provenance():
    # A calibration record (docs/calibration.md), and the same stored in a config.
    calib = {
        "source": "train_dir",
        "method": "normal_pixel_quantile",
        "q": 0.999,
        "normal_min": 0.1,
        "normal_max": 0.7,
    }
    assert scale_from_provenance(calib, 0.6) == MapScale(0.1, 0.6, 1.1, "given")
    prov = {"source": "infer_config", "method": "fixed", "value": 0.6, "stored_provenance": calib}
    assert scale_from_provenance(prov, 0.6) == MapScale(0.1, 0.6, 1.1, "given")
    assert scale_from_provenance({**calib, "normal_max": 3.0}, 0.6) == MapScale(
        0.1, 0.6, 3.0, "given"
    )
    assert scale_from_provenance({"source": "explicit", "method": "fixed"}, 0.6) is None
    assert scale_from_provenance(None, 0.6) is None
    assert scale_from_provenance({**calib, "normal_max": None}, 0.6) is None  # infinite max
    assert scale_from_provenance({**calib, "normal_min": 0.9}, 0.6) is None
    # render_overlay takes the fixed ends from the provenance: same colours for every map.
    prov = {"stored_provenance": {"normal_min": 0.0, "normal_max": 0.7}}
    a = render_overlay(anomaly_map=np.array([[0.3, 5.0]]), threshold=0.6, provenance=prov)
    b = render_overlay(anomaly_map=np.array([[0.3, 0.61]]), threshold=0.6, provenance=prov)
    assert _layout(a)["scale_ends"] == _layout(b)["scale_ends"] == [0.0, 0.6, 1.2]
    k = _layout(a)["scale"]
    ya, yb = _layout(a)["picture"][1], _layout(b)["picture"][1]
    np.testing.assert_array_equal(
        np.asarray(a)[ya + k // 2, k // 2], np.asarray(b)[yb + k // 2, k // 2]
    )
    np.testing.assert_allclose(
        np.asarray(a)[ya + k // 2, k // 2], _expected(0.3, 0.0, 0.6, 1.2), atol=1
    )


# ----------------------------------------------------------------------------
# The picture
# ----------------------------------------------------------------------------


def test_map_picture_pixels_outline_and_box():
    m = np.zeros((32, 32), np.float32)
    m[10:20, 5:12] = 1.0
    mask = m > 0.5
    pic = render_overlay(
        anomaly_map=m, mask=mask, boxes_xyxy=[[5, 10, 11, 19]], scores=[1.0], threshold=0.5
    )
    lay = _layout(pic)
    x0, y0, w, h = lay["picture"]
    assert lay["scale"] == 16 and (w, h) == (512, 512)
    a = np.asarray(pic)
    k = 16
    # Inside the region, away from the outline: the colour of 1.0 on the scale.
    s = map_scale(m, 0.5)
    np.testing.assert_allclose(a[y0 + 15 * k, x0 + 8 * k], _expected(1.0, s.lo, 0.5, s.hi), atol=1)
    # The mask outline: the region's first display column.
    np.testing.assert_array_equal(a[y0 + 15 * k, x0 + 5 * k], DEFECT)
    # The box: 2 * lw display pixels outside the region, in the defect colour.
    lw = max(1, round(512 / 320))
    col = x0 + 5 * k - 2 * lw + max(1, lw // 2)
    np.testing.assert_array_equal(a[y0 + 15 * k, col], DEFECT)
    # Far from everything: the colour of 0 (the darkest).
    np.testing.assert_array_equal(a[y0 + 30 * k, x0 + 30 * k], RECEDE[0][1])


def test_colorbar_threshold_tick_at_the_middle_of_the_bar():
    rng = np.random.default_rng(1)
    for shape, thr in (((128, 128), 0.6), ((40, 300), 2.0), ((3, 5), 0.0)):
        m = rng.normal(thr, 1.0, size=shape).astype(np.float32)
        pic = render_overlay(anomaly_map=m, threshold=thr)
        lay = _layout(pic)
        bx, by, bw, bh = lay["colorbar"]
        ty = lay["threshold_y"]
        assert ty == by + round(0.5 * (bh - 1))
        a = np.asarray(pic).astype(int)
        column = a[by : by + bh, bx + bw // 2]
        # Top (hi) is the brightest alarm colour, bottom (lo) the darkest recede colour
        # (the end rows themselves carry the end ticks).
        np.testing.assert_allclose(column[1], ALARM[-1][1], atol=8)
        np.testing.assert_allclose(column[-2], RECEDE[0][1], atol=2)
        warm = column[:, 0] >= 200
        # The tick is drawn across the bar at the threshold's row.
        np.testing.assert_array_equal(a[ty, bx + bw // 2], (255, 255, 255))
        # Warm exactly above the tick, cool exactly below (the tick's own rows excepted).
        lw = 4
        assert warm[1 : ty - by - lw].all() and not warm[ty - by + lw : -1].any()


def test_rank_tags_follow_report_order_not_labels():
    m = np.zeros((64, 64), np.float32)
    # Raster label 1 is the weak top-left spot; the worst region is bottom-right.
    boxes = [[40, 40, 49, 49], [5, 5, 9, 9], [30, 8, 35, 12]]
    scores = [3.0, 1.2, 0.9]
    for (x1, y1, x2, y2), s in zip(boxes, scores):
        m[y1 : y2 + 1, x1 : x2 + 1] = s
    pic = render_overlay(
        anomaly_map=m,
        mask=m > 0.5,
        boxes_xyxy=boxes,
        scores=scores,
        areas=[100, 25, 30],
        ids=[3, 1, 2],
        threshold=0.5,
    )
    lay = _layout(pic)
    assert [t["rank"] for t in lay["tags"]] == [1, 2, 3]
    px, py, _, _ = lay["picture"]
    k = lay["scale"]
    a = np.asarray(pic)
    for tag, (x1, y1, x2, y2) in zip(lay["tags"], boxes):
        tx1, ty1, tx2, ty2 = tag["xyxy"]
        # The tag sits by its own box: nearest box centre to the tag centre.
        cx, cy = (tx1 + tx2) / 2 - px, (ty1 + ty2) / 2 - py
        d = [
            np.hypot(cx - (b[0] + b[2] + 1) * k / 2, cy - (b[1] + b[3] + 1) * k / 2) for b in boxes
        ]
        assert int(np.argmin(d)) == tag["rank"] - 1
        # Its rank cell is filled with the defect colour.
        np.testing.assert_array_equal(a[ty1 + 1, tx1 + 1], DEFECT)
        # It does not cover its region.
        rx1, ry1, rx2, ry2 = px + x1 * k, py + y1 * k, px + (x2 + 1) * k, py + (y2 + 1) * k
        assert tx2 < rx1 or tx1 > rx2 or ty2 < ry1 or ty1 > ry2


@pytest.mark.parametrize("side", [96, 170, 400])
def test_crowded_tags_never_cover_each_other(side):
    """Eight regions in a tight grid: every tag stays readable (no tag covers another);
    where room is short a tag drops its area, then its score, rather than cover one."""
    rng = np.random.default_rng(1)
    m = rng.random((side, side)).astype(np.float32) * 0.3
    corners = [(0.1, 0.1), (0.22, 0.1), (0.34, 0.1), (0.1, 0.22), (0.22, 0.22), (0.34, 0.24),
               (0.5, 0.12), (0.12, 0.36)]  # fmt: skip
    boxes = []
    for fx, fy in corners:
        x1, y1 = int(fx * side), int(fy * side)
        x2, y2 = x1 + int(0.07 * side), y1 + int(0.07 * side)
        m[y1 : y2 + 1, x1 : x2 + 1] = 0.9
        boxes.append([x1, y1, x2, y2])
    pic = render_overlay(
        anomaly_map=m,
        mask=m > 0.5,
        boxes_xyxy=boxes,
        scores=list(np.linspace(0.95, 0.6, len(boxes))),
        areas=[(b[2] - b[0] + 1) * (b[3] - b[1] + 1) for b in boxes],
        threshold=0.5,
    )
    tags = [t["xyxy"] for t in _layout(pic)["tags"]]
    assert len(tags) == len(boxes)
    for i, a in enumerate(tags):
        for b in tags[:i]:
            apart = a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]
            assert apart, (side, a, b)


@pytest.mark.parametrize("shape", [(1, 1), (8, 8), (128, 128), (50, 300), (300, 7), (1, 40)])
def test_text_inside_the_picture_at_several_sizes(shape):
    h, w = shape
    m = np.zeros(shape, np.float32)
    # Regions touching every border and the corners.
    boxes = [[w - 1, h - 1, w - 1, h - 1], [0, 0, 0, 0], [w - 1, 0, w - 1, 0], [0, h - 1, 0, h - 1]]
    m[h - 1, w - 1] = 5.0
    pic = render_overlay(
        anomaly_map=m,
        mask=m > 1,
        boxes_xyxy=boxes,
        scores=[5.0, 0.0, 0.0, 0.0],
        areas=[123456, 1, 1, 1],
        threshold=1.0,
    )
    lay = _layout(pic)
    cw, ch = pic.size
    px, py, pw, ph = lay["picture"]
    assert min(pw, ph) >= min(512, max(pw, ph)) or max(pw, ph) >= 2048 // max(h, w) * max(h, w)
    for tag in lay["tags"]:
        x1, y1, x2, y2 = tag["xyxy"]
        assert 0 <= x1 <= x2 < cw and 0 <= y1 <= y2 < ch
        if x2 - x1 < pw and y2 - y1 < ph:
            assert px <= x1 and x2 < px + pw and py <= y1 and y2 < py + ph
    bx, by, bw, bh = lay["colorbar"]
    assert bx + bw <= cw and by + bh <= ch


def test_large_picture_scales_lines_and_text():
    m = np.zeros((2048, 2048), np.float32)
    m[1000:1100, 1000:1100] = 3.0
    pic = render_overlay(
        anomaly_map=m,
        mask=m > 1,
        boxes_xyxy=[[1000, 1000, 1099, 1099]],
        scores=[3.0],
        areas=[10000],
        threshold=1.0,
    )
    lay = _layout(pic)
    small = _layout(
        render_overlay(
            anomaly_map=m[::8, ::8],
            mask=m[::8, ::8] > 1,
            boxes_xyxy=[[125, 125, 137, 137]],
            scores=[3.0],
            areas=[169],
            threshold=1.0,
        )
    )
    assert lay["scale"] == 1 and small["scale"] == 2
    tag_h = lay["tags"][0]["xyxy"][3] - lay["tags"][0]["xyxy"][1]
    small_h = small["tags"][0]["xyxy"][3] - small["tags"][0]["xyxy"][1]
    assert tag_h >= 3 * small_h  # 2048 px vs 512 px: text grows with the picture
    assert lay["badge"][3] - lay["badge"][1] >= 3 * (small["badge"][3] - small["badge"][1])


def test_ok_and_ng_banner():
    m = np.zeros((16, 16), np.float32)
    m[3, 3] = 0.7  # above the threshold but no region reported (e.g. min_area)
    ok = render_overlay(anomaly_map=m, threshold=0.5)
    lay = _layout(ok)
    assert lay["verdict"] == "OK" and lay["tags"] == []
    x1, y1, _, _ = lay["badge"]
    np.testing.assert_array_equal(np.asarray(ok)[y1 + 1, x1 + 1], OK_RGB)
    ng = render_overlay(anomaly_map=m, boxes_xyxy=[[3, 3, 3, 3]], scores=[0.7], threshold=0.5)
    lay = _layout(ng)
    assert lay["verdict"] == "NG"
    x1, y1, _, _ = lay["badge"]
    np.testing.assert_array_equal(np.asarray(ng)[y1 + 1, x1 + 1], NG_RGB)
    forced = render_overlay(anomaly_map=m, threshold=0.5, defective=True, image_score=0.9)
    assert _layout(forced)["verdict"] == "NG"


def test_nan_maps():
    m = np.full((6, 9), np.nan, np.float32)
    pic = render_overlay(anomaly_map=m, threshold=1.0)
    lay = _layout(pic)
    px, py, pw, ph = lay["picture"]
    body = np.asarray(pic)[py : py + ph, px : px + pw].reshape(-1, 3)
    greys = {tuple(c) for c in np.unique(body, axis=0)}
    assert greys == {(70, 70, 70), (110, 110, 110)}
    m[2:4, 2:6] = 0.5
    m[0, 0] = np.inf
    pic = render_overlay(anomaly_map=m, threshold=1.0)
    a = np.asarray(pic)
    k = _layout(pic)["scale"]
    px, py = _layout(pic)["picture"][:2]
    np.testing.assert_array_equal(a[py + k // 2, px + k // 2], ALARM[-1][1])  # +inf: brightest
    # On an image, NaN is not tinted.
    img = np.full((6, 9, 3), 200, np.uint8)
    pic = render_overlay(image=img, anomaly_map=np.full((6, 9), np.nan), threshold=1.0)
    px, py, pw, ph = _layout(pic)["picture"]
    assert (np.asarray(pic)[py : py + ph, px : px + pw] == 160).all()  # 0.8 * 200


def test_tiny_maps():
    for shape in ((1, 1), (1, 7), (7, 1), (1, 1000)):
        m = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
        pic = render_overlay(anomaly_map=m, threshold=float(m.max()) / 2 + 0.25)
        pw, ph = _layout(pic)["picture"][2:]
        k = _layout(pic)["scale"]
        assert (ph, pw) == (shape[0] * k, shape[1] * k)
        assert max(pw, ph) <= max(2048, max(shape)) and pic.mode == "RGB"
    assert _layout(render_overlay(anomaly_map=np.zeros((1, 1)), threshold=1.0))["scale"] == 512


def test_image_with_map_blend_and_old_call_path():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    before = img.copy()
    m = np.zeros((10, 15), np.float32)  # half size: stretched over the image
    m[2:4, 3:6] = 2.0
    pic = render_overlay(
        image=img, anomaly_map=m, mask=np.zeros((20, 30), bool), threshold=1.0, lo=0.0, hi=3.0
    )
    np.testing.assert_array_equal(img, before)  # the caller's array is untouched
    lay = _layout(pic)
    k = lay["scale"]
    px, py = lay["picture"][:2]
    a = np.asarray(pic).astype(float)
    # Far below the threshold: the image dimmed and half desaturated, no tint.
    f = img[15, 25].astype(float)
    base = 0.8 * (0.5 * f + 0.5 * (f @ [0.299, 0.587, 0.114]))
    np.testing.assert_allclose(a[py + 15 * k, px + 25 * k], base, atol=1.0)
    # Above it: the alarm colour blended in (alpha 0.5 + 0.4 * (t - 0.5)).
    t = 0.5 + 0.5 * (2.0 - 1.0) / (3.0 - 1.0)
    alpha = 0.5 + 0.4 * (t - 0.5)
    f = img[5, 7].astype(float)
    base = 0.8 * (0.5 * f + 0.5 * (f @ [0.299, 0.587, 0.114]))
    want = base * (1 - alpha) + _expected(2.0, 0.0, 1.0, 3.0) * alpha
    np.testing.assert_allclose(a[py + 5 * k + 1, px + 7 * k + 1], want, atol=1.5)

    # The runner's call of today (ids given, no areas) still works.
    pic = render_overlay(
        image=img,
        mask=np.zeros((20, 30), bool),
        boxes_xyxy=[[1, 1, 5, 5]],
        scores=[0.9],
        ids=[7],
        threshold=0.5,
    )
    assert isinstance(pic, Image.Image) and _layout(pic)["tags"][0]["rank"] == 1
    gray = render_overlay(image=np.zeros((8, 8), np.float32), min_side=8)
    assert _layout(gray)["picture"][2:] == [8, 8] and _layout(gray)["colorbar"] is None


def test_errors():
    img = np.full((20, 30, 3), 128, np.uint8)
    with pytest.raises(ValueError, match="needs image or anomaly_map"):
        render_overlay()
    with pytest.raises(ValueError, match="mask must have shape"):
        render_overlay(image=img, mask=np.zeros((5, 5), bool))
    with pytest.raises(ValueError, match=r"scores must have one entry per box \(1\), got 2"):
        render_overlay(image=img, boxes_xyxy=[[0, 0, 1, 1]], scores=[1, 2])
    with pytest.raises(ValueError, match=r"boxes_xyxy\[0\] must be \[x1, y1, x2, y2\]"):
        render_overlay(image=img, boxes_xyxy=[[0, 0, 1]])
    with pytest.raises(ValueError, match="background must not be empty"):
        render_overlay(anomaly_map=np.zeros((0, 4)))
    with pytest.raises(ValueError, match="min_side must be an integer >= 1"):
        render_overlay(image=img, min_side=0)
    with pytest.raises(ValueError, match="lo < threshold < hi"):
        render_overlay(anomaly_map=np.zeros((4, 4)), threshold=1.0, lo=1.5)
    with pytest.raises(ValueError, match="image must have shape"):
        render_overlay(image=np.zeros((4, 4, 2)))


def test_render_record_uses_the_records_fields():
    rec = {
        "input": "imgs/part 7.png",
        "anomaly_map": {"shape": [8, 10]},
        "image_size": [16, 20],
        "label": 1,
        "score": 3.5,
        "defects": {
            "pixel_threshold": 1.0,
            "pixel_threshold_provenance": {"normal_min": 0.0, "normal_max": 1.1},
            "regions": [
                {
                    "id": 2,
                    "bbox_xyxy": [5, 4, 6, 5],
                    "area": 4,
                    "score_max": 3.5,
                    "bbox_xyxy_image": [10, 8, 13, 11],
                },
                {
                    "id": 1,
                    "bbox_xyxy": [0, 0, 1, 1],
                    "area": 4,
                    "score_max": None,
                    "bbox_xyxy_image": [0, 0, 3, 3],
                },
            ],
        },
    }
    m = np.zeros((8, 10), np.float32)
    m[4:6, 5:7] = 3.5
    img = np.full((16, 20, 3), 100, np.uint8)
    pic = render_record(rec, image=img, anomaly_map=m, min_side=160)
    lay = _layout(pic)
    assert lay["verdict"] == "NG" and lay["scale_ends"] == [0.0, 1.0, 2.0] and lay["scale"] == 10
    assert [t["rank"] for t in lay["tags"]] == [1, 2]
    # The first box is drawn in image pixels: [10, 8, 13, 11] * 10, 2 px outside (lw = 1),
    # its cyan line 1 px inside the dark edge; nothing where the map-space box would be.
    a = np.asarray(pic)
    px, py = lay["picture"][:2]
    np.testing.assert_array_equal(a[py + 100, px + 99], DEFECT)
    assert (a[py + 50, px + 49] != DEFECT).any()
    # Map-space boxes need a map-sized background.
    with pytest.raises(ValueError, match=r"image has shape \[5, 5\], but the record's boxes"):
        render_record({**rec, "image_size": None}, image=np.zeros((5, 5, 3), np.uint8))
    pic = render_record({**rec, "label": 0}, anomaly_map=m)
    assert _layout(pic)["verdict"] == "OK" and _layout(pic)["picture"][2:] == [640, 512]
    with pytest.raises(ValueError, match="an error record for 'x'"):
        render_record({"input": "x", "error": {"type": "unreadable", "message": "?"}})


def test_bitmap_font_fallback_for_old_pillow(monkeypatch):
    """Pillow < 10.1 has no scalable default font: the bitmap font, scaled, is used."""
    from PIL import ImageFont

    real = ImageFont.load_default

    def old_load_default(*args, **kwargs):
        if args or kwargs:
            raise TypeError("load_default() takes 0 positional arguments")
        return real()

    monkeypatch.setattr(ImageFont, "load_default", old_load_default)
    m = np.zeros((256, 256), np.float32)
    m[250:256, 250:256] = 2.0
    pic = render_overlay(
        anomaly_map=m,
        mask=m > 1,
        boxes_xyxy=[[250, 250, 255, 255]],
        scores=[2.0],
        areas=[36],
        threshold=1.0,
    )
    lay = _layout(pic)
    x1, y1, x2, y2 = lay["tags"][0]["xyxy"]
    px, py, pw, ph = lay["picture"]
    assert px <= x1 and x2 < px + pw and py <= y1 and y2 < py + ph
    # Text was drawn: the tag's rank cell holds dark glyph pixels on the defect colour.
    cell = np.asarray(pic)[y1:y2, x1 : x1 + 10]
    assert (cell.sum(axis=2) < 100).any() and (cell == DEFECT).all(axis=2).any()
