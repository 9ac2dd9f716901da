"""Image geometry: how anomaly-map pixels relate to the original image.

A detector sees the image resized (``resize``) or resized to cover its input and center
cropped (``resize_center_crop``); :class:`ImageSpace` maps boxes and masks back, and
:func:`preprocess_image` is the forward direction (the same arithmetic, one home).

Example:
    >>> s = ImageSpace.make((4, 4), (8, 8), center_crop=False)
    >>> s.bbox_to_image([1, 1, 2, 2])
    [2, 2, 5, 5]
"""

import dataclasses
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["ImageSpace", "Preprocess", "cover_size", "preprocess_image"]


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """Detector preprocessing: resize (or cover + center crop) to ``input_size``, then
    ``(x / 255 - mean) / std`` per channel."""

    input_size: Optional[Tuple[int, int]]
    mean: Optional[Tuple[float, ...]]
    std: Optional[Tuple[float, ...]]
    center_crop: bool


@dataclasses.dataclass(frozen=True)
class ImageSpace:
    """How anomaly-map pixels relate to the original image.

    ``resize``: the map covers the whole image, stretched. ``resize_center_crop``: the
    image was resized by the same factor on both axes to ``resized`` (height, width) so
    that it covers ``input_size``, then the center ``input_size`` was cut out at
    ``crop_offset_xy`` (``(resized - input_size) // 2``); the map covers that crop.
    """

    map_size: Tuple[int, int]
    image_size: Tuple[int, int]
    method: str = "resize"
    input_size: Optional[Tuple[int, int]] = None
    resized: Optional[Tuple[int, int]] = None
    crop_offset_xy: Optional[Tuple[int, int]] = None

    @staticmethod
    def make(
        map_size: Sequence[int],
        image_size: Sequence[int],
        center_crop: bool,
        input_size: Optional[Sequence[int]] = None,
    ) -> "ImageSpace":
        ms = (int(map_size[0]), int(map_size[1]))
        ims = (int(image_size[0]), int(image_size[1]))
        if not center_crop:
            return ImageSpace(ms, ims)
        ins = ms if input_size is None else (int(input_size[0]), int(input_size[1]))
        resized = cover_size(ims, ins)
        off = ((resized[1] - ins[1]) // 2, (resized[0] - ins[0]) // 2)
        return ImageSpace(ms, ims, "resize_center_crop", ins, resized, off)

    def to_json(self) -> Dict[str, Any]:
        d: Dict[str, Any] = {"method": self.method, "image_size": list(self.image_size)}
        if self.method == "resize_center_crop":
            d["input_size"] = list(self.input_size or ())
            d["resized_size"] = list(self.resized or ())
            d["crop_offset_xy"] = list(self.crop_offset_xy or ())
        return d

    def _x_to_image(self, x: float, axis: int) -> float:
        """A map coordinate (continuous, pixel edges at integers) in image coordinates."""
        m = self.map_size[axis]
        img = self.image_size[axis]
        if self.method == "resize":
            return x * img / m
        assert self.input_size and self.resized and self.crop_offset_xy
        off = self.crop_offset_xy[1 - axis]
        return (x * self.input_size[axis] / m + off) * img / self.resized[axis]

    def affine_xy(self) -> Tuple[Tuple[float, float], Tuple[float, float]]:
        """``((sx, sy), (ox, oy))``: map coordinate ``x`` is image coordinate ``x * sx + ox``.

        ``(sx, sy)`` is how many original-image pixels a map pixel spans (the head's
        ``map_to_image``); ``(ox, oy)`` is where the map's corner lies in the image (0 for a
        plain resize, the crop's offset in image pixels for a center crop).

        Example:
            >>> ImageSpace.make((4, 8), (40, 160), center_crop=False).affine_xy()
            ((20.0, 10.0), (0.0, 0.0))
        """
        scale: List[float] = []
        origin: List[float] = []
        for axis in (1, 0):
            m, img = self.map_size[axis], self.image_size[axis]
            if self.method == "resize":
                scale.append(img / m)
                origin.append(0.0)
            else:  # _x_to_image's arithmetic, split into its slope and offset
                assert self.input_size and self.resized and self.crop_offset_xy
                scale.append(self.input_size[axis] / m * img / self.resized[axis])
                origin.append(self.crop_offset_xy[1 - axis] * img / self.resized[axis])
        return (scale[0], scale[1]), (origin[0], origin[1])

    def bbox_to_image(self, bbox_xyxy: Sequence[int]) -> List[int]:
        """Inclusive map-pixel box -> inclusive image-pixel box covering it."""
        x1, y1, x2, y2 = (int(v) for v in bbox_xyxy)
        h, w = self.image_size

        def span(a: int, b: int, axis: int, size: int) -> Tuple[int, int]:
            lo = math.floor(self._x_to_image(a, axis) + 1e-9)
            hi = math.ceil(self._x_to_image(b + 1, axis) - 1e-9) - 1
            lo = min(max(lo, 0), size - 1)
            hi = min(max(hi, lo), size - 1)
            return lo, hi

        ix1, ix2 = span(x1, x2, 1, w)
        iy1, iy2 = span(y1, y2, 0, h)
        return [ix1, iy1, ix2, iy2]

    def mask_to_image(self, mask: np.ndarray) -> np.ndarray:
        """Map-space bool mask -> image-space bool mask, nearest (pixel centres)."""
        return self._to_image(mask, np.zeros(self.image_size, dtype=bool))

    def map_to_image(self, anomaly_map: np.ndarray) -> np.ndarray:
        """Map values -> image space, nearest (pixel centres); NaN where the map does not
        reach (outside a center crop)."""
        return self._to_image(anomaly_map, np.full(self.image_size, np.nan, dtype=np.float32))

    def _to_image(self, values: np.ndarray, out: np.ndarray) -> np.ndarray:
        h, w = self.image_size
        rows = self._index(h, 0)
        cols = self._index(w, 1)
        r_ok = rows >= 0
        c_ok = cols >= 0
        out[np.ix_(r_ok, c_ok)] = values[np.ix_(rows[r_ok], cols[c_ok])]
        return out

    def _index(self, n: int, axis: int) -> np.ndarray:
        m = self.map_size[axis]
        centers = np.arange(n, dtype=np.float64) + 0.5
        if self.method == "resize":
            idx = np.floor(centers * m / n)
        else:
            assert self.input_size and self.resized and self.crop_offset_xy
            off = self.crop_offset_xy[1 - axis]
            inp = centers * self.resized[axis] / n - off
            idx = np.floor(inp * m / self.input_size[axis])
            idx[(inp < 0) | (inp >= self.input_size[axis])] = -1
        idx = np.where(idx >= m, m - 1, idx)
        return idx.astype(np.int64)


def cover_size(image_size: Tuple[int, int], input_size: Tuple[int, int]) -> Tuple[int, int]:
    """Size of ``image_size`` scaled by one factor to cover ``input_size``."""
    h, w = image_size
    s = max(input_size[0] / h, input_size[1] / w)
    return (max(input_size[0], round(h * s)), max(input_size[1], round(w * s)))


def preprocess_image(img: np.ndarray, prep: Optional[Preprocess]) -> Tensor:
    """An ``(H, W, 3)`` uint8 image as the detector's :math:`(3, h, w)` float input."""
    from PIL import Image

    pic = Image.fromarray(img, mode="RGB")
    if prep is not None and prep.input_size is not None:
        ih, iw = prep.input_size
        if prep.center_crop:
            rh, rw = cover_size((img.shape[0], img.shape[1]), (ih, iw))
            pic = pic.resize((rw, rh), Image.BILINEAR)
            ox, oy = (rw - iw) // 2, (rh - ih) // 2
            pic = pic.crop((ox, oy, ox + iw, oy + ih))
        elif (ih, iw) != (img.shape[0], img.shape[1]):
            pic = pic.resize((iw, ih), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(pic, dtype=np.float32) / np.float32(255.0)).permute(2, 0, 1)
    if prep is not None and prep.mean is not None:
        x = x - torch.tensor(prep.mean, dtype=torch.float32).view(-1, 1, 1)
    if prep is not None and prep.std is not None:
        x = x / torch.tensor(prep.std, dtype=torch.float32).view(-1, 1, 1)
    return x.contiguous()
