"""Mask dilation by OpenCV's elliptic structuring element (pyimgano's ``mask_dilate_ksize``).

pyimgano dilates the final mask with ``cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))``
and ``cv2.dilate``; :func:`dilate_ellipse` is bit-equal to that, batched on the device.
"""

import math
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor

from torchdefects._check import _as_b1hw, _check_bool_mask

__all__ = ["dilate_ellipse", "ellipse_kernel"]


def ellipse_kernel(ksize: int) -> Tensor:
    """``cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (ksize, ksize))`` as a bool :math:`(k, k)`.

    Row ``i`` holds columns ``c - dx .. c + dx`` with ``r = c = ksize // 2``,
    ``dy = i - r`` and ``dx = round(c * sqrt((r*r - dy*dy) / (r*r)))`` (half to even, as
    OpenCV's ``saturate_cast``), clipped to the kernel.

    Example:
        >>> ellipse_kernel(5).int()
        tensor([[0, 0, 1, 0, 0],
                [1, 1, 1, 1, 1],
                [1, 1, 1, 1, 1],
                [1, 1, 1, 1, 1],
                [0, 0, 1, 0, 0]], dtype=torch.int32)
    """
    if ksize < 1:
        raise ValueError(f"ksize must be an integer >= 1, got {ksize}")
    r = ksize // 2
    c = ksize // 2
    inv_r2 = 1.0 / (r * r) if r > 0 else 0.0
    rows: List[Tensor] = []
    cols = torch.arange(ksize)
    for i in range(ksize):
        dy = i - r
        # round half to even, like lrint under the default rounding mode
        v = c * math.sqrt((r * r - dy * dy) * inv_r2)
        dx = int(torch.round(torch.tensor(v, dtype=torch.float64)))
        lo = max(c - dx, 0)
        hi = min(c + dx + 1, ksize)
        rows.append((cols >= lo) & (cols < hi))
    return torch.stack(rows, 0)


def dilate_ellipse(mask: Tensor, ksize: int) -> Tensor:
    r"""Dilate masks by the elliptic ``ksize x ksize`` element: ``cv2.dilate`` bit for bit.

    Pixels outside the image count as background (OpenCV's default border for dilation).
    The anchor is the kernel centre ``(ksize // 2, ksize // 2)``, for even sizes too.

    Args:
        mask: bool :math:`(B, 1, H, W)` or :math:`(B, H, W)`.
        ksize: kernel size; ``0`` or ``1`` returns the mask unchanged.

    Returns:
        bool tensor of the mask's shape.

    Example:
        >>> m = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
        >>> m[0, 0, 2, 2] = True
        >>> dilate_ellipse(m, 3)[0, 0].int()
        tensor([[0, 0, 0, 0, 0],
                [0, 0, 1, 0, 0],
                [0, 1, 1, 1, 0],
                [0, 0, 1, 0, 0],
                [0, 0, 0, 0, 0]], dtype=torch.int32)
    """
    _check_bool_mask(mask, "mask")
    if ksize < 0:
        raise ValueError(f"ksize must be an integer >= 0, got {ksize}")
    if ksize <= 1 or mask.numel() == 0:
        return mask
    x = _as_b1hw(mask, "mask")
    a = ksize // 2
    kernel = ellipse_kernel(ksize).to(device=x.device, dtype=torch.float32)
    padded = F.pad(x.to(torch.float32), [a, ksize - 1 - a, a, ksize - 1 - a])
    # Sums of 0/1 below 2**24 are exact in float32, whatever order the convolution adds in.
    hits = F.conv2d(padded, kernel.view(1, 1, ksize, ksize))
    return (hits > 0.5).view(mask.shape)
