"""torchdefects.overlay: colormap, outline, and what gets drawn where."""

import numpy as np
import pytest
import scipy.ndimage as ndi
from PIL import Image

from torchdefects.overlay import heatmap, mask_outline, render_overlay


def test_heatmap_monotone_brightness_and_range():
    a = np.linspace(0.0, 1.0, 256).reshape(16, 16)
    rgb = heatmap(a)
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
    lum = rgb.astype(float) @ [0.299, 0.587, 0.114]
    assert np.all(np.diff(lum.ravel()) >= -1e-9)  # dark -> bright
    assert lum.ravel()[0] < 10 and lum.ravel()[-1] > 200
    np.testing.assert_array_equal(heatmap(a, vmin=0.0, vmax=2.0)[-1, -1], heatmap(a)[8, 0])


def test_heatmap_nan_and_constant():
    a = np.full((4, 4), 3.0)
    a[0, 0] = np.nan
    rgb = heatmap(a)
    assert (rgb[0, 0] == 0).all()
    with pytest.raises(ValueError, match=r"anomaly_map must have shape \(H, W\)"):
        heatmap(np.zeros((2, 2, 2)))


def test_mask_outline_equals_erosion_oracle():
    rng = np.random.default_rng(0)
    m = ndi.binary_opening(rng.random((40, 50)) > 0.4)
    want = m & ~ndi.binary_erosion(m, structure=ndi.generate_binary_structure(2, 1), border_value=0)
    np.testing.assert_array_equal(mask_outline(m), want)
    assert not mask_outline(np.zeros((5, 5), bool)).any()


def test_render_overlay_draws_outline_and_box_where_they_belong():
    m = np.zeros((32, 32), np.float32)
    m[10:20, 5:12] = 1.0
    mask = m > 0.5
    pic = render_overlay(
        anomaly_map=m, mask=mask, boxes_xyxy=[[4, 9, 12, 20]], scores=[0.91], ids=[1], min_side=64
    )
    assert pic.size == (64, 64) and pic.mode == "RGB"
    a = np.asarray(pic)
    # Scale 2: the box's left edge is display column 8 (rows 18..41), its bottom row 41.
    np.testing.assert_array_equal(a[25, 8], [0, 200, 255])
    np.testing.assert_array_equal(a[41, 20], [0, 200, 255])
    # The mask outline: display column 10 (the mask's first column) and row 39 (its last row).
    np.testing.assert_array_equal(a[25, 10], [0, 255, 0])
    np.testing.assert_array_equal(a[39, 16], [0, 255, 0])
    # Inside the mask, the heat map's brightest colour.
    np.testing.assert_array_equal(a[30, 16], heatmap(m)[15, 8])
    # Far from everything: the heat map's darkest colour.
    np.testing.assert_array_equal(a[60, 60], heatmap(m)[30, 30])


def test_render_overlay_on_image_and_errors():
    img = np.full((20, 30, 3), 128, np.uint8)
    pic = render_overlay(image=img, mask=np.zeros((20, 30), bool), min_side=20)
    assert pic.size == (30, 20)
    assert (np.asarray(pic) == 128).all()
    gray = render_overlay(image=np.zeros((8, 8), np.float32), min_side=8)
    assert isinstance(gray, Image.Image)
    with pytest.raises(ValueError, match="needs image or anomaly_map"):
        render_overlay()
    with pytest.raises(ValueError, match="mask must have shape"):
        render_overlay(image=img, mask=np.zeros((5, 5), bool))
