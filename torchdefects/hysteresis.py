"""Hysteresis thresholding: keep the components of ``map >= low`` that hold a pixel ``>= high``."""

from typing import Optional, Tuple

import torch
from torch import Tensor

from torchdefects._check import _as_b1hw, _as_per_image, _check_float_map
from torchdefects.components import connected_components
from torchdefects.roi import roi_mask

__all__ = ["hysteresis_bounds", "hysteresis_threshold"]


def hysteresis_bounds(
    pixel_threshold: Tensor, low: Optional[float] = None, high: Optional[float] = None
) -> Tuple[Tensor, Tensor]:
    """pyimgano's low and high thresholds, per image, as float64 :math:`(B,)` tensors.

    ``high`` defaults to the pixel threshold, ``low`` to ``high / 2`` (``high * 0.5``); when
    ``high < low`` the two are swapped (pyimgano's ``hysteresis_anomaly_map_to_binary_mask``).

    Args:
        pixel_threshold: float :math:`(B,)` (or a scalar tensor), the image's pixel threshold.
        low: the config's ``hysteresis_low`` or ``None``.
        high: the config's ``hysteresis_high`` or ``None``.

    Example:
        >>> low, high = hysteresis_bounds(torch.tensor([0.8, 0.6]))
        >>> low.float(), high.float()
        (tensor([0.4000, 0.3000]), tensor([0.8000, 0.6000]))
    """
    thr = pixel_threshold.to(torch.float64)
    hi = thr if high is None else torch.full_like(thr, high)
    lo = hi * 0.5 if low is None else torch.full_like(thr, low)
    return torch.minimum(lo, hi), torch.maximum(lo, hi)


def hysteresis_threshold(
    anomaly_map: Tensor,
    low: Tensor,
    high: Tensor,
    connectivity: int = 8,
    roi: Optional[Tensor] = None,
) -> Tensor:
    r"""Foreground by hysteresis: components of ``map >= low`` that hold a pixel ``>= high``.

    Components are those of :func:`~torchdefects.connected_components` at ``connectivity``
    (pyimgano uses 8). The comparisons are ``>=`` (pyimgano; scikit-image's
    ``apply_hysteresis_threshold`` uses ``>``) in the dtype :func:`~torchdefects.binarize`
    uses (float32, float64 for float64 maps). When ``low > high`` the two are swapped per
    image. NaN pixels are never foreground; pixels outside the ROI are never foreground and
    never seeds. The work after labeling is one scatter over the pixels into a fixed-size
    table (no host sync).

    Args:
        anomaly_map: :math:`(B, 1, H, W)` or :math:`(B, H, W)` float map.
        low: scalar tensor or :math:`(B,)`, the low threshold per image.
        high: scalar tensor or :math:`(B,)`, the high threshold per image.
        connectivity: 4 or 8.
        roi: optional :math:`(4,)` normalized ``[x1, y1, x2, y2]``.

    Returns:
        bool tensor of the map's shape.

    Example:
        >>> m = torch.tensor([[[0.9, 0.5, 0.0, 0.5]]])
        >>> hysteresis_threshold(m, torch.tensor(0.4), torch.tensor(0.8))
        tensor([[[ True,  True, False, False]]])
    """
    _check_float_map(anomaly_map, "anomaly_map")
    if connectivity != 4 and connectivity != 8:
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    x = _as_b1hw(anomaly_map, "anomaly_map")
    b, h, w = x.shape[0], x.shape[2], x.shape[3]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    lo = _as_per_image(low, b, "low").to(device=x.device, dtype=dtype)
    hi = _as_per_image(high, b, "high").to(device=x.device, dtype=dtype)
    lo, hi = torch.minimum(lo, hi).view(b, 1, 1, 1), torch.maximum(lo, hi).view(b, 1, 1, 1)
    xv = x.to(dtype)
    weak = xv >= lo
    strong = xv >= hi
    if roi is not None:
        inside = roi_mask(roi.to(x.device), h, w)
        weak = weak & inside
        strong = strong & inside
    labels, _ = connected_components(weak, connectivity)
    # Per image a fixed-size table over the labels 0..H*W, so no region count is read back.
    index = labels.reshape(b, h * w).to(torch.int64)
    seeded = torch.zeros(b, h * w + 1, dtype=torch.int32, device=x.device)
    # amax is order-free: the same table on every device (as the other stages' scatters).
    seeded.scatter_reduce_(1, index, strong.reshape(b, h * w).to(torch.int32), reduce="amax")
    keep = (seeded.gather(1, index) > 0).view(x.shape) & weak
    return keep.view(anomaly_map.shape)
