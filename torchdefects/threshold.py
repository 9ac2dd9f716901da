"""Binarize an anomaly map: ``map >= pixel_threshold`` inside the ROI."""

from typing import Optional

import torch
from torch import Tensor

from torchdefects._check import (
    _as_b1hw,
    _as_per_image,
    _check_finite_values,
    _check_float_map,
    _check_tensor,
    _number_or_tensor,
)
from torchdefects.roi import _check_roi_tensor, _roi_mask

__all__ = ["binarize"]


def _compare_dtype(map_dtype: torch.dtype) -> torch.dtype:
    """The dtype :func:`binarize` compares in: float64 for float64 maps, else float32."""
    if map_dtype == torch.float64:
        return torch.float64
    return torch.float32


def binarize(anomaly_map: Tensor, pixel_threshold: Tensor, roi: Optional[Tensor] = None) -> Tensor:
    """Foreground pixels of an anomaly map: ``map >= pixel_threshold``, inside the ROI only.

    The comparison runs in float32 (float16 and bfloat16 maps are upcast, the threshold is
    rounded to float32), except for float64 maps, which compare in float64 against the
    threshold in float64, so a float64 map is never rounded. NaN pixels are never foreground,
    ``+inf`` pixels always are (a ``-inf`` threshold selects every pixel that is not NaN).
    A NaN threshold is an error in eager mode (scripted code
    skips that check, which needs a host sync, and a NaN threshold selects nothing). Pixels
    outside the ROI are never foreground, whatever the threshold.

    Args:
        anomaly_map: :math:`(B, 1, H, W)` or :math:`(B, H, W)`, float16/bfloat16/float32/float64.
        pixel_threshold: a scalar tensor, or one threshold per image :math:`(B,)`. In eager
            mode a Python number is accepted too.
        roi: :math:`(4,)` normalized ``[x1, y1, x2, y2]`` (see :func:`~torchdefects.roi_mask`),
            or ``None`` for the whole map.

    Returns:
        bool tensor with the shape of ``anomaly_map``.

    Raises:
        TypeError: the map is not a floating-point tensor (a NumPy array included), the
            threshold is bool/complex, the ROI is not a floating tensor.
        ValueError: bad map, threshold or ROI shape; in eager mode, a threshold or ROI that
            is not finite (NaN would otherwise silently select nothing).

    Example:
        >>> m = torch.tensor([[[0.1, 0.5], [float("nan"), float("inf")]]])
        >>> binarize(m, torch.tensor(0.5))
        tensor([[[False,  True],
                 [False,  True]]])
    """
    if not torch.jit.is_scripting():
        _check_tensor(anomaly_map, "anomaly_map")
        pixel_threshold = _number_or_tensor(pixel_threshold, "pixel_threshold")
        if pixel_threshold is None:
            raise TypeError("pixel_threshold must be a number or a torch.Tensor, got None")
        _check_finite_values(pixel_threshold, "pixel_threshold", allow_inf=True)
        _check_roi_tensor(roi)
    _check_float_map(anomaly_map, "anomaly_map")
    x = _as_b1hw(anomaly_map, "anomaly_map")
    batch, height, width = x.shape[0], x.shape[2], x.shape[3]
    dtype = _compare_dtype(x.dtype)
    thr = _as_per_image(pixel_threshold, batch, "pixel_threshold")
    thr = thr.to(device=x.device, dtype=dtype).view(batch, 1, 1, 1)
    mask = x.to(dtype) >= thr
    if roi is not None:
        mask = mask & _roi_mask(roi.to(x.device), height, width)
    return mask.view(anomaly_map.shape)
