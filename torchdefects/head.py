"""``DefectHead``: the defect pipeline as one nn.Module; see the functions it composes."""

import json
from dataclasses import replace
from typing import Final, NamedTuple, Optional

import torch
from torch import Tensor, nn

from torchdefects._check import _as_b1hw, _as_per_image, _check_float_map
from torchdefects.components import connected_components
from torchdefects.config import DefectsConfig
from torchdefects.morphology import closing, fill_holes, opening
from torchdefects.regions import Regions, region_stats, select_regions
from torchdefects.roi import roi_mask, roi_stats, roi_tensor
from torchdefects.threshold import binarize

__all__ = ["DefectHead", "Defects"]


class Defects(NamedTuple):
    """What :class:`DefectHead` returns.

    Attributes:
        mask: bool :math:`(B, 1, H, W)`, the pixels of the reported regions.
        labels: int32 :math:`(B, 1, H, W)`, 0 background, else the region's ``label``.
        num_regions: int64 :math:`(B,)`, regions reported per image.
        regions: :class:`~torchdefects.Regions`, flat over the batch, grouped by image in batch
            order, within an image sorted by ``score_max`` desc, ``area`` desc, ``label`` asc.
        roi_max: float32 :math:`(B,)`, max of the map over the ROI pixels (NaN ignored).
        roi_mean: float32 :math:`(B,)`, mean of the map over the ROI pixels (NaN ignored).
        pixel_threshold: float32 :math:`(B,)`, the threshold used for each image.
    """

    mask: Tensor
    labels: Tensor
    num_regions: Tensor
    regions: Regions
    roi_max: Tensor
    roi_mean: Tensor
    pixel_threshold: Tensor


class DefectHead(nn.Module):
    """Defects from anomaly maps: ROI gate, threshold, open, close, fill holes, label, select.

    A thin composition of :func:`~torchdefects.binarize`, :func:`~torchdefects.opening`,
    :func:`~torchdefects.closing`, :func:`~torchdefects.fill_holes`,
    :func:`~torchdefects.connected_components`, :func:`~torchdefects.region_stats`,
    :func:`~torchdefects.select_regions` and :func:`~torchdefects.roi_stats`; see them for the
    exact semantics. One rule is the head's own: when there is a ROI, the mask is gated by it
    again after the closing, because a closing can switch on pixels outside the ROI where the
    ROI meets the image border (OpenCV/kornia borders ignore the outside of the image).

    The threshold and the ROI are buffers in float64 (``threshold``, ``roi``), so they follow
    ``.to(device)`` and the state dict; a dtype cast of the module (``.half()``) leaves them
    in float64, so the threshold is never rounded to the map's precision before the comparison.

    Args:
        config: the settings; ``config.pixel_threshold`` may be ``None`` when every call gives
            ``pixel_threshold``.

    Shape:
        - anomaly_map: :math:`(B, 1, H, W)` or :math:`(B, H, W)`, float16/bfloat16/float32/float64.
        - pixel_threshold: scalar tensor or :math:`(B,)`, overrides the config's threshold.
        - Output: :class:`Defects`, masks and labels :math:`(B, 1, H, W)` whatever the input.

    Example:
        >>> head = DefectHead(DefectsConfig(pixel_threshold=0.5, open_ksize=3))
        >>> out = head(torch.rand(2, 1, 32, 32))
        >>> out.mask.shape, out.num_regions.shape
        (torch.Size([2, 1, 32, 32]), torch.Size([2]))
    """

    has_threshold: Final[bool]
    has_roi: Final[bool]
    open_ksize: Final[int]
    close_ksize: Final[int]
    fill_holes: Final[bool]
    min_area: Final[int]
    max_regions: Final[Optional[int]]
    connectivity: Final[int]

    def __init__(self, config: DefectsConfig) -> None:
        super().__init__()
        if not isinstance(config, DefectsConfig):
            raise TypeError(f"config must be a DefectsConfig, got {type(config).__name__}")
        # A validated copy: later edits to the caller's config cannot desync the flags below.
        config = replace(config)
        self.config = config
        # JSON of the config, kept as a plain attribute so scripted modules carry it too.
        self.config_json: str = json.dumps(config.to_dict(), sort_keys=True)
        self.has_threshold = config.pixel_threshold is not None
        self.has_roi = config.roi_xyxy_norm is not None
        self.open_ksize = config.open_ksize
        self.close_ksize = config.close_ksize
        self.fill_holes = config.fill_holes
        self.min_area = config.min_area
        self.max_regions = config.max_regions
        self.connectivity = config.connectivity
        thr = config.pixel_threshold if config.pixel_threshold is not None else float("nan")
        self.register_buffer("threshold", torch.tensor(thr, dtype=torch.float64))
        self.register_buffer("roi", roi_tensor(config.roi_xyxy_norm))

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        kept = {"threshold": self.threshold, "roi": self.roi}
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = getattr(self, name)
            if after.dtype != before.dtype:
                # Follow the device, keep the exact float64 value.
                setattr(self, name, before.to(after.device))
        return self

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.to_dict().items())

    def forward(self, anomaly_map: Tensor, pixel_threshold: Optional[Tensor] = None) -> Defects:
        _check_float_map(anomaly_map, "anomaly_map")
        x = _as_b1hw(anomaly_map, "anomaly_map")
        batch, height, width = x.shape[0], x.shape[2], x.shape[3]
        if pixel_threshold is None:
            if not self.has_threshold:
                raise ValueError(
                    "pixel_threshold must be given: the config has pixel_threshold=None, "
                    "so pass forward(anomaly_map, pixel_threshold=tensor)"
                )
            thr = self.threshold
        else:
            thr = pixel_threshold
        thr = _as_per_image(thr, batch, "pixel_threshold").to(x.device)
        roi: Optional[Tensor] = None
        if self.has_roi:
            roi = self.roi

        mask = binarize(x, thr, roi)
        if self.open_ksize > 0:
            mask = opening(mask, self.open_ksize)
        if self.close_ksize > 0:
            mask = closing(mask, self.close_ksize)
            if roi is not None:
                mask = mask & roi_mask(roi, height, width)
        if self.fill_holes:
            mask = fill_holes(mask)
        labels, counts = connected_components(mask, self.connectivity)
        regions = region_stats(labels, counts, x)
        labels, regions, num_regions = select_regions(
            labels, regions, batch, self.min_area, self.max_regions
        )
        roi_max, roi_mean = roi_stats(x, roi)
        return Defects(
            mask=labels != 0,
            labels=labels,
            num_regions=num_regions,
            regions=regions,
            roi_max=roi_max,
            roi_mean=roi_mean,
            pixel_threshold=thr.to(torch.float32).contiguous(),
        )
