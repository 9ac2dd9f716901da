"""anomalib's normalised maps: min-max around the threshold, the threshold at 0.5."""

from typing import Tuple

import torch
from torch import Tensor

from torchdefects._check import _as_b1hw, _as_per_image, _check_float_map

__all__ = ["normalize_map", "sensitivity_threshold"]


def normalize_map(anomaly_map: Tensor, threshold: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    r"""``clamp((map - threshold) / (hi - lo) + 0.5, 0, 1)``, anomalib's ``_normalize``.

    The threshold lands on 0.5, ``threshold +- (hi - lo) / 2`` on 0 and 1. ``lo`` and ``hi`` are
    the min and max of the normal maps (the calibrator can keep them); as in anomalib, a NaN
    threshold means ``(lo + hi) / 2``. ``hi - lo`` must be positive (not checked per call:
    ``hi == lo`` gives 0/1 steps and NaN at the threshold, as in anomalib). NaN pixels stay
    NaN. Computed in float32 (float64 for float64 maps).

    Args:
        anomaly_map: :math:`(B, 1, H, W)` or :math:`(B, H, W)` float map.
        threshold: scalar tensor or :math:`(B,)`.
        lo: scalar tensor or :math:`(B,)`.
        hi: scalar tensor or :math:`(B,)`.

    Returns:
        The normalised map, the input's shape.

    Example:
        >>> m = torch.tensor([[[0.0, 2.0, 4.0, 9.0]]])
        >>> normalize_map(m, torch.tensor(2.0), torch.tensor(0.0), torch.tensor(8.0))
        tensor([[[0.2500, 0.5000, 0.7500, 1.0000]]])
    """
    _check_float_map(anomaly_map, "anomaly_map")
    x = _as_b1hw(anomaly_map, "anomaly_map")
    b = x.shape[0]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    t = _as_per_image(threshold, b, "threshold").to(device=x.device, dtype=torch.float64)
    lo64 = _as_per_image(lo, b, "lo").to(device=x.device, dtype=torch.float64)
    hi64 = _as_per_image(hi, b, "hi").to(device=x.device, dtype=torch.float64)
    t = torch.where(torch.isnan(t), (hi64 + lo64) / 2, t)
    t = t.to(dtype).view(b, 1, 1, 1)
    span = (hi64 - lo64).to(dtype).view(b, 1, 1, 1)
    out = ((x.to(dtype) - t) / span + 0.5).clamp(0.0, 1.0)
    return out.view(anomaly_map.shape)


def sensitivity_threshold(
    threshold: Tensor, lo: Tensor, hi: Tensor, sensitivity: float = 0.5
) -> Tuple[Tensor, Tensor]:
    r"""The raw-map threshold that anomalib's ``sensitivity`` sets, and its normalised value.

    anomalib labels a normalised score ``s`` anomalous when ``s > 1 - sensitivity``
    (``PostProcessor.normalized_pixel_threshold``). With :func:`normalize_map` that is the raw
    threshold ``threshold + (0.5 - sensitivity) * (hi - lo)`` (computed in float64):
    ``sensitivity = 0.5`` keeps the calibrated threshold, higher values lower it (more
    defects), lower values raise it. torchdefects compares ``>=`` where anomalib compares
    ``>``, so a pixel exactly on the threshold differs.

    Args:
        threshold: the calibrated pixel threshold, scalar tensor or :math:`(B,)`.
        lo: min of the normal maps.
        hi: max of the normal maps.
        sensitivity: in ``[0, 1]``.

    Returns:
        ``(raw, normalized)``: float64 raw threshold(s) and ``1 - sensitivity`` as a tensor.

    Example:
        >>> sensitivity_threshold(torch.tensor(2.0), torch.tensor(0.0), torch.tensor(8.0), 0.75)
        (tensor(0., dtype=torch.float64), tensor(0.2500, dtype=torch.float64))
    """
    if not (0.0 <= sensitivity <= 1.0):
        raise ValueError(f"sensitivity must be in [0, 1], got {sensitivity}")
    t = threshold.to(torch.float64)
    span = hi.to(torch.float64) - lo.to(torch.float64)
    raw = t + (0.5 - sensitivity) * span
    return raw, torch.tensor(1.0 - sensitivity, dtype=torch.float64)
