"""torchdefects.geometry: map <-> image pixel space, and the detector's preprocessing."""

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from torchdefects.geometry import ImageSpace, Preprocess, cover_size, preprocess_image


def test_image_space_center_crop_mapping():
    # Image 100 x 200 (h, w) -> cover 50 x 50 at scale 0.5: 50 x 100, crop columns 25..74.
    sp = ImageSpace.make((25, 25), (100, 200), True, (50, 50))
    assert sp.resized == (50, 100) and sp.crop_offset_xy == (25, 0)
    assert sp.bbox_to_image([0, 0, 24, 24]) == [50, 0, 149, 99]
    assert sp.bbox_to_image([3, 4, 3, 4]) == [(2 * 3 + 25) * 2, 16, (2 * 4 + 25) * 2 - 1, 19]
    m = np.zeros((25, 25), bool)
    m[0, 0] = True
    img = sp.mask_to_image(m)
    ys, xs = np.nonzero(img)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (0, 3, 50, 53)
    assert sp.mask_to_image(np.ones((25, 25), bool)).sum() == 100 * 100


@pytest.mark.parametrize(
    "map_hw,img_hw", [((16, 20), (48, 40)), ((7, 5), (20, 33)), ((9, 9), (9, 9))]
)
def test_resize_mask_is_nearest_by_pixel_centre(map_hw, img_hw):
    rng = np.random.default_rng(0)
    m = rng.random(map_hw) > 0.5
    sp = ImageSpace.make(map_hw, img_hw, False)
    # Oracle: OpenCV's nearest by pixel centres.
    want = cv2.resize(m.astype(np.uint8), img_hw[::-1], interpolation=cv2.INTER_NEAREST_EXACT)
    np.testing.assert_array_equal(sp.mask_to_image(m), want.astype(bool))


def test_preprocess_equals_pil_resize_crop_and_normalize():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    prep = Preprocess((16, 16), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), True)
    got = preprocess_image(img, prep)
    rh, rw = cover_size((30, 50), (16, 16))
    assert (rh, rw) == (16, 27)
    pic = Image.fromarray(img).resize((rw, rh), Image.BILINEAR)
    ox, oy = (rw - 16) // 2, (rh - 16) // 2
    ref = np.asarray(pic, dtype=np.float32)[oy : oy + 16, ox : ox + 16] / np.float32(255)
    ref = (ref - np.float32([0.5, 0.4, 0.3])) / np.float32([0.2, 0.25, 0.3])
    torch.testing.assert_close(got, torch.from_numpy(ref).permute(2, 0, 1), rtol=0, atol=1e-6)
    plain = preprocess_image(img, None)
    assert plain.shape == (3, 30, 50) and float(plain.max()) <= 1.0
