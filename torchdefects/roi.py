"""ROI gating: which pixels of an anomaly map may ever be foreground."""

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from torchdefects._check import (
    _as_b1hw,
    _check_finite_values,
    _check_float_map,
    _check_tensor,
    check_roi,
)

__all__ = ["roi_bounds", "roi_mask", "roi_stats", "roi_tensor"]


def roi_tensor(roi: Optional[Sequence[float]], device: Optional[torch.device] = None) -> Tensor:
    """Validate a ROI given as four numbers and return it as a float64 tensor of shape (4,).

    Plain Python (not scriptable): use it once, at construction, to build the tensor that
    :func:`roi_mask` takes. ``None`` gives the whole map ``[0, 0, 1, 1]``.

    Args:
        roi: ``[x1, y1, x2, y2]`` normalized to [0, 1], or ``None``.
        device: where to put the tensor.

    Returns:
        float64 tensor of shape :math:`(4,)`.

    Raises:
        ValueError: ``roi`` is not four finite numbers.

    Example:
        >>> roi_tensor([0.1, 0.2, 0.9, 0.8])
        tensor([0.1000, 0.2000, 0.9000, 0.8000], dtype=torch.float64)
    """
    check_roi("roi", roi)
    values: List[float] = [0.0, 0.0, 1.0, 1.0] if roi is None else [float(v) for v in roi]
    return torch.tensor(values, dtype=torch.float64, device=device)


def roi_bounds(roi: Tensor, height: int, width: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pixel bounds of a normalized ROI: ``(col_start, col_stop, row_start, row_stop)``.

    The ROI is clamped to [0, 1] and each axis reordered; columns
    ``floor(x1 * W) .. ceil(x2 * W) - 1`` and rows ``floor(y1 * H) .. ceil(y2 * H) - 1`` are
    inside, so the stops are exclusive. The arithmetic runs in float64 (the ROI is upcast), so
    the bounds equal Python's ``math.floor`` / ``math.ceil`` on the same numbers.

    Args:
        roi: :math:`(4,)` floating tensor ``[x1, y1, x2, y2]``.
        height: map height ``H``.
        width: map width ``W``.

    Returns:
        four int64 scalar tensors on ``roi``'s device (no host synchronization).
    """
    if roi.dim() != 1 or roi.shape[0] != 4:
        raise ValueError(f"roi must have shape (4,), got {list(roi.shape)}")
    if not roi.is_floating_point():
        raise TypeError(f"roi must be a floating tensor, got {str(roi.dtype)}")
    r = roi.to(torch.float64).clamp(0.0, 1.0)
    x1 = torch.minimum(r[0], r[2])
    x2 = torch.maximum(r[0], r[2])
    y1 = torch.minimum(r[1], r[3])
    y2 = torch.maximum(r[1], r[3])
    col_start = torch.floor(x1 * width).to(torch.int64)
    col_stop = torch.ceil(x2 * width).to(torch.int64)
    row_start = torch.floor(y1 * height).to(torch.int64)
    row_stop = torch.ceil(y2 * height).to(torch.int64)
    return col_start, col_stop, row_start, row_stop


def roi_mask(roi: Tensor, height: int, width: int) -> Tensor:
    """Boolean mask of the pixels inside a normalized ROI.

    Args:
        roi: :math:`(4,)` floating tensor ``[x1, y1, x2, y2]`` in [0, 1] (clamped, reordered).
        height: map height ``H``.
        width: map width ``W``.

    Returns:
        bool tensor of shape :math:`(H, W)` on ``roi``'s device; ``True`` inside.

    Example:
        >>> roi_mask(torch.tensor([0.0, 0.0, 0.5, 1.0]), 2, 4).int()
        tensor([[1, 1, 0, 0],
                [1, 1, 0, 0]], dtype=torch.int32)
    """
    if not torch.jit.is_scripting():
        _check_roi_tensor(roi)
        _check_size(height, "height")
        _check_size(width, "width")
    return _roi_mask(roi, height, width)


def _roi_mask(roi: Tensor, height: int, width: int) -> Tensor:
    """:func:`roi_mask` without the eager argument checks (the head's ROI is validated once)."""
    if height < 0 or width < 0:
        raise ValueError(f"height and width must be >= 0, got {height} and {width}")
    col_start, col_stop, row_start, row_stop = roi_bounds(roi, height, width)
    cols = torch.arange(width, device=roi.device)
    rows = torch.arange(height, device=roi.device)
    inside_cols = (cols >= col_start) & (cols < col_stop)
    inside_rows = (rows >= row_start) & (rows < row_stop)
    return inside_rows.unsqueeze(1) & inside_cols.unsqueeze(0)


def _masked_stats(values: Tensor, valid: Tensor) -> Tuple[Tensor, Tensor]:
    """Max and mean of each row of ``values`` (B, N) over its ``valid`` (B, N) entries.

    float32 results; the sum is accumulated in float64 (CPU and CUDA reduce in different
    orders, float32 sums would differ in their last bits); NaN where a row has no valid entry.
    """
    count = valid.sum(1)
    if values.shape[1] == 0:
        # amax needs a non-empty reduced dimension.
        nan = torch.full((values.shape[0],), float("nan"), device=values.device)
        return nan, nan.clone()
    maximum = torch.where(valid, values, float("-inf")).amax(1)
    total = torch.where(valid, values, 0.0).sum(1, dtype=torch.float64)
    maximum = maximum.to(torch.float32).masked_fill(count == 0, float("nan"))
    return maximum, (total / count).to(torch.float32)


def roi_stats(anomaly_map: Tensor, roi: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Max and mean of each map over the ROI pixels, NaN pixels ignored.

    Computed in float32 (float64 for float64 maps), the mean accumulated in float64, and
    returned as float32, the same bits on CPU and CUDA. An image with no ROI pixel that is
    not NaN (an empty ROI, an all-NaN ROI, a 0-sized map) gets NaN for both.

    Args:
        anomaly_map: :math:`(B, 1, H, W)` or :math:`(B, H, W)`, float16/bfloat16/float32/float64.
        roi: :math:`(4,)` normalized ``[x1, y1, x2, y2]``, or ``None`` for the whole map.

    Returns:
        ``(roi_max, roi_mean)``, two float32 tensors of shape :math:`(B,)`.

    Raises:
        TypeError: ``anomaly_map`` is not a float tensor, ``roi`` not a float tensor.
        ValueError: bad shapes; a ROI that is not finite (eager).

    Example:
        >>> m = torch.tensor([[[1.0, float("nan")], [3.0, 8.0]]])
        >>> roi_stats(m, torch.tensor([0.0, 0.0, 0.5, 1.0]))
        (tensor([3.]), tensor([2.]))
    """
    if not torch.jit.is_scripting():
        _check_tensor(anomaly_map, "anomaly_map")
        _check_roi_tensor(roi)
    _check_float_map(anomaly_map, "anomaly_map")
    x = _as_b1hw(anomaly_map, "anomaly_map")
    batch, height, width = x.shape[0], x.shape[2], x.shape[3]
    if x.dtype != torch.float64 and x.dtype != torch.float32:
        x = x.float()
    x = x.reshape(batch, height * width)
    valid = x == x  # not NaN
    if roi is not None:
        valid = valid & _roi_mask(roi.to(x.device), height, width).reshape(1, height * width)
    return _masked_stats(x, valid)


def _check_size(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"{name} must be an integer, got {value!r}")


def _check_roi_tensor(roi: Optional[Tensor]) -> None:
    """Eager checks of a ROI tensor argument (type, finiteness; shape is checked later)."""
    if roi is None:
        return
    _check_tensor(roi, "roi")
    if not roi.is_floating_point():
        raise TypeError(f"roi must be a floating tensor, got {str(roi.dtype)}")
    _check_finite_values(roi, "roi")
