"""``DefectHead``: the defect pipeline as one nn.Module; see the functions it composes."""

import json
from dataclasses import replace
from typing import Any, Final, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from torchdefects._check import (
    _as_b1hw,
    _as_per_image,
    _check_finite_values,
    _check_float_map,
    _check_tensor,
    _is_tracing,
    _number_or_tensor,
)
from torchdefects._fill_label import _fill_label_regions
from torchdefects.components import connected_components
from torchdefects.config import DefectsConfig
from torchdefects.ellipse import dilate_ellipse
from torchdefects.filters import border_ignore, smooth_map, smoothing_ksize
from torchdefects.hysteresis import hysteresis_bounds, hysteresis_threshold
from torchdefects.morphology import _square, closing, fill_holes, opening
from torchdefects.region_filters import finalize_regions, merge_nearby, quantile_keep, region_keep
from torchdefects.regions import Regions, _label_regions, select_regions
from torchdefects.roi import _masked_stats, _roi_mask, roi_tensor
from torchdefects.severity import _feature_table, _first_rule, parse_severity_rules
from torchdefects.shape import solidity as _solidity
from torchdefects.threshold import binarize

__all__ = ["DefectHead", "Defects", "StaticDefectHead", "StaticDefects"]


class Defects(NamedTuple):
    """What :class:`DefectHead` returns.

    Attributes:
        mask: bool :math:`(B, 1, H, W)`, the pixels of the reported regions; with
            ``config.mask_space == "full"``, the whole-map mask instead (see
            :class:`DefectHead`, "Mask space").
        labels: int32 :math:`(B, 1, H, W)`, 0 background, else the region's ``label``.
        num_regions: int64 :math:`(B,)`, regions reported per image.
        regions: :class:`~torchdefects.Regions`, flat over the batch, grouped by image in batch
            order, within an image sorted by ``score_max`` desc, ``area`` desc, ``label`` asc.
        roi_max: float32 :math:`(B,)`, max of the map over the ROI pixels (NaN ignored).
        roi_mean: float32 :math:`(B,)`, mean of the map over the ROI pixels (NaN ignored).
        pixel_threshold: float32 :math:`(B,)`, the threshold used for each image.
        image_score: float32 :math:`(B,)`, the image score: the detector's when ``forward``
            got ``image_score``, else ``roi_max`` (the rule; there is no flag in the output).
        image_label: int64 :math:`(B,)`, 1 defective, 0 good: ``image_score >=
            config.image_threshold`` when the config sets one, else ``num_regions > 0``.
        solidity: float64 :math:`(N,)` per reported region (rows of ``regions``) when the
            config sets ``min_solidity`` (eager heads only), else ``None``. NaN where the
            hull area is 0; NaN for a merged group (pyimgano leaves it out).
        merged_from: int64 :math:`(M, 2)` when ``merge_nearby_enabled``, else ``None``: rows
            ``[i, label]``, one per fragment of each reported region ``i`` (a row of
            ``regions``), the fragment's label before merging; sorted by ``i`` then label.
            A region that merged nothing has one row, its own label.
        severity: int64 :math:`(N,)` when the config sets ``severity_rules``, else ``None``:
            per reported region (rows of ``regions``), the index of the first rule whose
            conditions all hold (the name is ``config.severity_rules[i]["name"]``), -1 for
            none.
        image_severity: int64 :math:`(B,)` with ``severity_rules``, else ``None``: the image's
            most severe class (the lowest index among its regions), -1 without one.

    The shape statistics of the regions (``bbox_area``, ``fill_ratio``, ``aspect_ratio``) are
    :func:`~torchdefects.shape_stats` of ``regions`` (exact, from the bboxes; no cost in the
    head's graph).
    """

    mask: Tensor
    labels: Tensor
    num_regions: Tensor
    regions: Regions
    roi_max: Tensor
    roi_mean: Tensor
    pixel_threshold: Tensor
    image_score: Tensor
    image_label: Tensor
    solidity: Optional[Tensor]
    merged_from: Optional[Tensor]
    severity: Optional[Tensor]
    image_severity: Optional[Tensor]


class StaticDefects(NamedTuple):
    """What ``DefectHead(config, static_output=True)`` returns: fixed-capacity outputs.

    The regions are padded to ``K = config.max_regions`` rows per image, the convention of
    detection exports (TensorRT ``EfficientNMS``: ``num_detections``, then fixed-size boxes,
    scores, classes): image ``b`` has ``num_regions[b]`` valid rows, in the order of
    :class:`Defects` ``regions`` (``score_max`` desc, ``area`` desc, ``label`` asc); the rows
    past ``num_regions[b]`` are all zero. No output size depends on the data, so the head
    exports (torch.export, ONNX) with static output shapes given ``B, H, W``.

    Attributes:
        mask: bool :math:`(B, 1, H, W)`, the pixels of the reported regions.
        labels: int32 :math:`(B, 1, H, W)`, 0 background, else the region's ``label``.
        num_regions: int64 :math:`(B,)`, valid rows per image (``<= K``).
        boxes: int64 :math:`(B, K, 4)`, inclusive ``[x1, y1, x2, y2]`` in map pixels.
        area: int64 :math:`(B, K)`, pixel count.
        label: int64 :math:`(B, K)`, the region's value in ``labels`` (0 on padding rows).
        centroid: float32 :math:`(B, K, 2)`, mean ``[x, y]`` of the region's pixels.
        score_max: float32 :math:`(B, K)`, max of the map over the region.
        score_mean: float32 :math:`(B, K)`, mean of the map over the region.
        roi_max: float32 :math:`(B,)`, as in :class:`Defects`.
        roi_mean: float32 :math:`(B,)`, as in :class:`Defects`.
        pixel_threshold_used: float32 :math:`(B,)`, the threshold used for each image.
        image_score: float32 :math:`(B,)`, as in :class:`Defects`.
        image_label: int64 :math:`(B,)`, as in :class:`Defects`.
        severity: int64 :math:`(B, K)`, each row's severity class as in :class:`Defects`;
            -1 on padding rows (0 is the most severe class, so padding is not 0 here), and
            -1 everywhere when the config has no ``severity_rules``.
        image_severity: int64 :math:`(B,)`, as in :class:`Defects`; -1 without rules.
    """

    mask: Tensor
    labels: Tensor
    num_regions: Tensor
    boxes: Tensor
    area: Tensor
    label: Tensor
    centroid: Tensor
    score_max: Tensor
    score_mean: Tensor
    roi_max: Tensor
    roi_mean: Tensor
    pixel_threshold_used: Tensor
    image_score: Tensor
    image_label: Tensor
    severity: Tensor
    image_severity: Tensor


def _pad_regions(
    regions: Regions, num_regions: Tensor, capacity: int
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Flat regions (grouped by image, at most ``capacity`` each) to zero-padded (B, K, ...)."""
    batch = num_regions.shape[0]
    first = torch.cumsum(num_regions, 0) - num_regions
    rank = torch.arange(regions.area.shape[0], device=num_regions.device)
    slot = regions.batch_index * capacity + rank - first.index_select(0, regions.batch_index)
    ints = torch.cat([regions.bbox_xyxy, regions.area.unsqueeze(1), regions.label.unsqueeze(1)], 1)
    floats = torch.cat(
        [
            regions.centroid_xy.to(torch.float32),
            regions.score_max.to(torch.float32).unsqueeze(1),
            regions.score_mean.to(torch.float32).unsqueeze(1),
        ],
        1,
    )
    ints = ints.new_zeros(batch * capacity, 6).index_copy(0, slot, ints).view(batch, capacity, 6)
    floats = floats.new_zeros(batch * capacity, 4).index_copy(0, slot, floats)
    floats = floats.view(batch, capacity, 4)
    return (
        ints[:, :, 0:4],
        ints[:, :, 4],
        ints[:, :, 5],
        floats[:, :, 0:2],
        floats[:, :, 2],
        floats[:, :, 3],
    )


def _pad_classes(values: Tensor, batch_index: Tensor, num_regions: Tensor, capacity: int) -> Tensor:
    """Flat per-region int64 values (grouped by image) to :math:`(B, K)`, -1 padded."""
    batch = num_regions.shape[0]
    first = torch.cumsum(num_regions, 0) - num_regions
    rank = torch.arange(values.shape[0], device=num_regions.device)
    slot = batch_index * capacity + rank - first.index_select(0, batch_index)
    out = torch.full((batch * capacity,), -1, dtype=torch.int64, device=num_regions.device)
    return out.index_copy(0, slot, values).view(batch, capacity)


class _HeadOut(NamedTuple):
    labels: Tensor
    num_regions: Tensor
    regions: Regions
    roi_max: Tensor
    roi_mean: Tensor
    pixel_threshold: Tensor
    image_score: Tensor
    image_label: Tensor
    solidity: Optional[Tensor]
    merged_from: Optional[Tensor]
    severity: Optional[Tensor]
    image_severity: Optional[Tensor]
    full_mask: Optional[Tensor]


def _per_label(labels: Tensor, batch_index: Tensor, label: Tensor, values: Tensor) -> Tensor:
    """The map of ``values[i]`` on the pixels of region ``(batch_index[i], label[i])`` of
    ``labels`` (B, 1, H, W), 0/False elsewhere: one gather through a table over every
    (image, label) pair, no host sync."""
    b, h, w = labels.shape[0], labels.shape[2], labels.shape[3]
    width = h * w + 1
    key_dtype = labels.dtype if b * width < 2**31 else torch.int64
    table = torch.zeros(b * width, dtype=values.dtype, device=labels.device)
    table = table.index_put((batch_index * width + label,), values)
    base = (torch.arange(b, device=labels.device) * width).to(key_dtype).view(b, 1, 1, 1)
    return table.index_select(0, (labels.to(key_dtype) + base).reshape(-1)).view(labels.shape)


def _kept_pixels(labels: Tensor, regions: Regions, keep: Tensor) -> Tensor:
    """bool mask of the pixels whose region (a row of ``regions``, the rows of ``labels``'s
    :func:`~torchdefects.region_stats`) has ``keep`` set."""
    return _per_label(labels, regions.batch_index, regions.label, keep)


def _keep_labels(labels: Tensor, kept: Regions) -> Tensor:
    """The label map with only the pixels whose ``(image, label)`` is a row of ``kept``
    (``select_regions``' relabel)."""
    return _per_label(labels, kept.batch_index, kept.label, kept.label.to(labels.dtype))


def _merged_pairs(merged_into: Tensor, label: Tensor, keep_before: Tensor, index: Tensor) -> Tensor:
    """``Defects.merged_from``: ``[output row, fragment label]`` pairs, int64 (M, 2)."""
    total = merged_into.shape[0]
    device = merged_into.device
    out_row = torch.full((total,), -1, dtype=torch.int64, device=device)
    out_row.index_copy_(0, index, torch.arange(index.shape[0], device=device))
    member_row = out_row.index_select(0, merged_into)
    member_row = torch.where(keep_before, member_row, torch.full_like(member_row, -1))
    rows = torch.nonzero(member_row >= 0).view(-1)
    # Table rows are in (image, label) order: a stable sort by output row keeps labels ascending.
    target = member_row.index_select(0, rows)
    order = torch.sort(target, stable=True).indices
    rows = rows.index_select(0, order)
    return torch.stack([target.index_select(0, order), label.index_select(0, rows)], 1)


class DefectHead(nn.Module):
    """Defects from anomaly maps: ROI gate, threshold, open, close, fill holes, label, select.

    With the toolbox fields of the config (docs/postprocessing.md, in this order): border
    ignore and smoothing before the threshold (region scores from the conditioned map,
    ``roi_max``/``roi_mean`` from the raw one), hysteresis instead of the plain threshold,
    elliptic dilation after the morphology, then the region filters, merging, the
    ``score_max`` quantile, and the sort by ``max_regions_sort_by`` before ``max_regions``
    (:func:`~torchdefects.region_keep`, :func:`~torchdefects.merge_nearby`,
    :func:`~torchdefects.quantile_keep`, :func:`~torchdefects.finalize_regions`). Stages at
    their neutral value cost nothing (``Final`` flags). ``min_solidity`` is host-side: a head
    with it runs eager only (``torch.jit.script`` raises).

    A thin composition of :func:`~torchdefects.binarize`, :func:`~torchdefects.opening`,
    :func:`~torchdefects.closing`, :func:`~torchdefects.fill_holes`,
    :func:`~torchdefects.connected_components`, :func:`~torchdefects.region_stats`,
    :func:`~torchdefects.select_regions` and :func:`~torchdefects.roi_stats`; see them for the
    exact semantics. The head's own rules:

    - **ROI and NaN gate.** A pixel outside the ROI or whose map value is NaN is never
      foreground, after any stage: the threshold excludes them, and the head removes them
      again after the closing (a closing can switch on a pixel outside the ROI where the ROI
      meets the image border, or a NaN pixel between two foreground ones) and after hole
      filling (a NaN pixel enclosed by a region is a hole). So no region holds a NaN pixel and
      no region score is NaN.
    - **Image score and label.** ``image_score`` is the detector's image score when
      ``forward`` gets one, else ``roi_max``; ``image_label`` is ``image_score >=
      config.image_threshold`` when the config sets it, else 1 when the image has a reported
      region. The comparison is in float32 (the threshold rounded to float32, like the pixel
      threshold for float32 maps), so a score printed as 0.9 meets a threshold of 0.9. A NaN
      image score is never defective by threshold.
    - **Severity.** With ``config.severity_rules`` each reported region takes the index of the
      first rule whose conditions all hold (``Defects.severity``, -1 for none) and each image
      its lowest region index (``Defects.image_severity``); millimetre conditions use
      ``pixel_size_mm`` times ``map_to_image`` (docs/postprocessing.md, "Units and severity").

    **Mask space** (``config.mask_space``, pyimgano's). ``"roi"`` (the default): ``mask`` is
    ``labels != 0``, the reported regions. ``"full"`` (pyimgano's mask "for debugging"):
    ``mask`` is the mask over the whole map, made by the same stages with no ROI gate
    (threshold or hysteresis, open, close, fill holes, dilation; NaN pixels are never
    foreground), then labeled at ``connectivity`` and filtered per component by ``min_area``,
    ``min_score_max``, ``min_score_mean``, ``min_fill_ratio``, ``max_aspect_ratio`` and
    ``min_solidity`` (scores on the conditioned map), but not by ``max_regions`` nor
    ``min_score_max_quantile`` (merging never changes mask pixels): pyimgano's
    ``postprocess_binary_mask`` rule, in our order of stages (filters after fill and
    dilation). Everything else (``labels``, ``regions``, ``num_regions``, the image score and
    label) stays ROI-gated. Without an ROI the two masks are equal unless ``max_regions`` or
    the quantile drops a region. :class:`StaticDefectHead` refuses ``"full"``.

    The threshold, the image threshold and the ROI are buffers in float64 (``threshold``,
    ``image_threshold``, ``roi``), so they follow ``.to(device)``; ``threshold`` and ``roi``
    are in the state dict (``image_threshold`` only in the config); a dtype
    cast of the module (``.half()``) leaves them in float64, so the threshold is never rounded
    to the map's precision before the comparison.

    ``DefectHead(config, static_output=True)`` builds a :class:`StaticDefectHead`, whose forward
    returns :class:`StaticDefects` (regions padded to ``config.max_regions`` rows): the form
    that :mod:`torchdefects.export` writes to ``.pt2`` and ONNX.

    Args:
        config: the settings; ``config.pixel_threshold`` may be ``None`` when every call gives
            ``pixel_threshold``.
        static_output: return :class:`StaticDefects` (needs ``config.max_regions``).

    Shape:
        - anomaly_map: :math:`(B, 1, H, W)` or :math:`(B, H, W)`, float16/bfloat16/float32/float64.
        - pixel_threshold: a number (eager only), a scalar tensor or :math:`(B,)`; overrides
          the config's threshold.
        - image_score: optional scalar or :math:`(B,)` tensor, the detector's image scores.
        - map_to_image: optional ``(sx, sy)`` (eager), :math:`(2,)` or :math:`(B, 2)` tensor,
          > 0: how many original-image pixels a map pixel spans, for ``pixel_size_mm``
          severity rules (a map pixel is ``pixel_size_mm * (sx, sy)`` mm); default
          ``(1, 1)``. Exported graphs take no such input and use ``(1, 1)``.
        - Output: :class:`Defects`, masks and labels :math:`(B, 1, H, W)` whatever the input.

    Raises:
        TypeError: ``anomaly_map`` is not a float tensor (NumPy arrays included), a threshold
            or image score of the wrong type.
        ValueError: bad shapes, a NaN per-call threshold (eager), no threshold at all.

    Example:
        >>> head = DefectHead(DefectsConfig(pixel_threshold=0.5, open_ksize=3))
        >>> out = head(torch.rand(2, 1, 32, 32))
        >>> out.mask.shape, out.num_regions.shape, out.image_label.dtype
        (torch.Size([2, 1, 32, 32]), torch.Size([2]), torch.int64)
        >>> head(torch.rand(2, 32, 32), 0.9).pixel_threshold
        tensor([0.9000, 0.9000])
    """

    has_threshold: Final[bool]
    has_roi: Final[bool]
    has_image_threshold: Final[bool]
    open_ksize: Final[int]
    close_ksize: Final[int]
    fill_holes: Final[bool]
    min_area: Final[int]
    max_regions: Final[Optional[int]]
    connectivity: Final[int]
    border_ignore_px: Final[int]
    smoothing: Final[bool]
    smoothing_method: Final[str]
    smoothing_ksize: Final[int]
    smoothing_sigma: Final[float]
    conditioned: Final[bool]
    hysteresis: Final[bool]
    hysteresis_low: Final[Optional[float]]
    hysteresis_high: Final[Optional[float]]
    dilate_ksize: Final[int]
    min_score_max: Final[Optional[float]]
    min_score_mean: Final[Optional[float]]
    min_fill_ratio: Final[Optional[float]]
    max_aspect_ratio: Final[Optional[float]]
    min_solidity: Final[Optional[float]]
    merge: Final[bool]
    merge_gap: Final[int]
    quantile: Final[Optional[float]]
    sort_by: Final[str]
    toolbox_regions: Final[bool]
    has_severity: Final[bool]
    has_units: Final[bool]
    pixel_size_mm: Final[float]
    severity_columns: List[int]
    severity_names: List[str]
    full_mask: Final[bool]
    full_filters: Final[bool]

    def __new__(cls, *args: Any, **kwargs: Any) -> "DefectHead":
        static = kwargs.get("static_output", args[1] if len(args) > 1 else False)
        if cls is DefectHead and static is True:
            cls = StaticDefectHead
        return super().__new__(cls)

    def __init__(self, config: DefectsConfig, static_output: bool = False) -> None:
        super().__init__()
        if not isinstance(config, DefectsConfig):
            raise TypeError(f"config must be a DefectsConfig, got {type(config).__name__}")
        if not isinstance(static_output, bool):
            raise TypeError(f"static_output must be True or False, got {static_output!r}")
        if static_output and config.max_regions is None:
            raise ValueError(
                "static_output=True needs config.max_regions (the capacity K of the padded "
                "outputs), got None"
            )
        # A validated copy: later edits to the caller's config cannot desync the flags below.
        config = replace(config)
        self.config = config
        # JSON of the config, kept as a plain attribute so scripted modules carry it too.
        self.config_json: str = json.dumps(config.to_dict(), sort_keys=True)
        self.has_threshold = config.pixel_threshold is not None
        self.has_roi = config.roi_xyxy_norm is not None
        self.has_image_threshold = config.image_threshold is not None
        self.open_ksize = config.open_ksize
        self.close_ksize = config.close_ksize
        self.fill_holes = config.fill_holes
        self.min_area = config.min_area
        self.max_regions = config.max_regions
        self.connectivity = config.connectivity
        # Toolbox stages (docs/postprocessing.md); at their neutral values they add nothing to
        # the graph: every branch below tests a Final constant.
        self.border_ignore_px = config.border_ignore_px
        self.smoothing_method = config.map_smoothing_method
        self.smoothing_ksize = config.map_smoothing_ksize
        self.smoothing_sigma = float(config.map_smoothing_sigma)
        self.smoothing = (
            smoothing_ksize(config.map_smoothing_method, config.map_smoothing_ksize,
                            config.map_smoothing_sigma) > 0
        )  # fmt: skip
        self.conditioned = self.border_ignore_px > 0 or self.smoothing
        self.hysteresis = config.hysteresis_enabled
        self.hysteresis_low = config.hysteresis_low
        self.hysteresis_high = config.hysteresis_high
        self.dilate_ksize = config.mask_dilate_ksize
        self.min_score_max = config.min_score_max
        self.min_score_mean = config.min_score_mean
        self.min_fill_ratio = config.min_fill_ratio
        self.max_aspect_ratio = config.max_aspect_ratio
        self.min_solidity = config.min_solidity
        self.merge = config.merge_nearby_enabled and config.merge_nearby_max_gap_px > 0
        self.merge_gap = config.merge_nearby_max_gap_px
        self.quantile = config.min_score_max_quantile
        self.sort_by = config.max_regions_sort_by
        self.toolbox_regions = (
            config.min_score_max is not None
            or config.min_score_mean is not None
            or config.min_fill_ratio is not None
            or config.max_aspect_ratio is not None
            or config.min_solidity is not None
            or self.merge
            or config.min_score_max_quantile is not None
            or config.max_regions_sort_by != "score_max"
        )
        # mask_space "full": a second, ungated mask (see the class docstring); None when "roi".
        self.full_mask = config.mask_space == "full"
        self.full_filters = (
            config.min_area > 1
            or config.min_score_max is not None
            or config.min_score_mean is not None
            or config.min_fill_ratio is not None
            or config.max_aspect_ratio is not None
            or config.min_solidity is not None
        )
        thr = config.pixel_threshold if config.pixel_threshold is not None else float("nan")
        self.register_buffer("threshold", torch.tensor(thr, dtype=torch.float64))
        image_thr = config.image_threshold
        image_thr = image_thr if image_thr is not None else float("nan")
        # Not in the state dict (older state dicts keep loading); the config carries it.
        self.register_buffer(
            "image_threshold", torch.tensor(image_thr, dtype=torch.float64), persistent=False
        )
        self.register_buffer("roi", roi_tensor(config.roi_xyxy_norm))
        # Severity (docs/postprocessing.md): the rules as (N, C) tables, outside the state dict
        # (the config carries them); float64 like the thresholds.
        rules = parse_severity_rules(config.severity_rules or [], config.pixel_size_mm is not None)
        self.severity_names = rules.names
        self.has_severity = config.severity_rules is not None
        self.has_units = config.pixel_size_mm is not None
        self.pixel_size_mm = float(config.pixel_size_mm or 1.0)
        # Only the columns some rule tests are computed (SEVERITY_KEYS indices).
        used = [c for c in range(rules.active.shape[1]) if bool(rules.active[:, c].any())]
        self.severity_columns = used
        self.register_buffer(
            "severity_thresholds", rules.thresholds[:, used].contiguous(), persistent=False
        )
        active = rules.active[:, used].contiguous()
        self.register_buffer("severity_active", active, persistent=False)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        kept = {"threshold": self.threshold, "image_threshold": self.image_threshold}
        kept["roi"] = self.roi
        kept["severity_thresholds"] = self.severity_thresholds
        super()._apply(fn, recurse)
        for name, before in kept.items():
            after = getattr(self, name)
            if after.dtype != before.dtype:
                # Follow the device, keep the exact float64 value.
                setattr(self, name, before.to(after.device))
        return self

    @torch.jit.ignore
    def __prepare_scriptable__(self):  # type: ignore[no-untyped-def]
        # torch.jit.script calls this first: solidity is host-side (a Python hull).
        if self.min_solidity is not None:
            raise ValueError(
                f"min_solidity={self.min_solidity} is not supported in scripted heads "
                "(solidity is computed on the host); use the eager DefectHead or drop it"
            )
        return self

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config.to_dict().items())

    def _labels(
        self,
        anomaly_map: Tensor,
        pixel_threshold: Optional[Tensor],
        with_stats: bool,
        select: bool = False,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Optional[Regions], bool]:
        """Conditioning, threshold, gates, morphology, labeling (and region statistics).

        Returns ``(scored, xc, allowed, thr, labels, counts, regions)``: the map regions are
        scored on (border-ignored and smoothed when configured, else the input), the raw map
        in the comparison dtype and its NaN/ROI gate (for the ROI statistics), the per-image
        threshold, the labels and counts, and with ``with_stats`` their
        :func:`~torchdefects.region_stats` (computed with the labeling, from its runs). The
        last item says whether the fused pass ran (:mod:`torchdefects._fill_label`; then no
        pixel of the scored map is NaN, and with ``select`` the labels, counts and regions are
        those of :func:`~torchdefects.select_regions` with ``min_area``, ``max_regions``).
        """
        _check_float_map(anomaly_map, "anomaly_map")
        x = _as_b1hw(anomaly_map, "anomaly_map")
        batch, height, width = x.shape[0], x.shape[2], x.shape[3]
        if pixel_threshold is None:
            if not self.has_threshold:
                raise ValueError(
                    "pixel_threshold must be given: the config has pixel_threshold=None, "
                    "so pass forward(anomaly_map, pixel_threshold=...)"
                )
            thr = self.threshold
        else:
            thr = pixel_threshold
        thr = _as_per_image(thr, batch, "pixel_threshold")
        # binarize's rule: float32 comparison, float64 for float64 maps.
        cmp_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        xc = x if x.dtype == cmp_dtype else x.to(cmp_dtype)
        thr = thr.to(device=x.device, dtype=cmp_dtype)
        # NaN fails every comparison, so x == x is "not NaN" in one pass.
        allowed = xc == xc
        not_nan = allowed
        if self.has_roi:
            allowed = allowed & _roi_mask(self.roi, height, width)
        scored = x
        xs = xc
        gate = allowed
        if self.conditioned:
            if self.border_ignore_px > 0:
                scored = border_ignore(scored, self.border_ignore_px)
            if self.smoothing:
                scored = smooth_map(
                    scored, self.smoothing_method, self.smoothing_ksize, self.smoothing_sigma
                )
            xs = scored if scored.dtype == cmp_dtype else scored.to(cmp_dtype)
            gate = xs == xs
            not_nan = gate
            if self.has_roi:
                gate = gate & _roi_mask(self.roi, height, width)
        if self.hysteresis:
            low, high = hysteresis_bounds(thr, self.hysteresis_low, self.hysteresis_high)
            roi: Optional[Tensor] = None
            if self.has_roi:
                roi = self.roi
            mask = hysteresis_threshold(xs, low, high, self.connectivity, roi)
        else:
            mask = xs >= thr.view(batch, 1, 1, 1)
            if self.has_roi:
                mask = mask & gate
        # The fused pass (holes, labels, statistics; _fill_label.py) runs on maps without NaN:
        # without an ROI its gate after the closing is all True, and is only needed when the
        # pass declines (a NaN pixel), so it is applied then.
        fused = with_stats and self.fill_holes and self.dilate_ksize == 0
        fused = fused and batch * height * width > 0
        gate_closed = self.has_roi or not fused
        closed = False
        if self.open_ksize > 0 and self.close_ksize > 0:
            # The opening's dilation and the closing's compose into one square of side
            # open + close - 1 (windows clipped to a rectangle compose exactly).
            mask = _square(mask, self.open_ksize, False)
            mask = _square(mask, self.open_ksize + self.close_ksize - 1, True)
            mask = _square(mask, self.close_ksize, False)
            closed = True
        elif self.open_ksize > 0:
            mask = opening(mask, self.open_ksize)
        elif self.close_ksize > 0:
            mask = closing(mask, self.close_ksize)
            closed = True
        if closed and gate_closed:
            mask = mask & gate
        if fused:
            # One pass for holes, labels and statistics. The gate after filling is implied:
            # a pixel outside the ROI rectangle reaches the border through background, so it
            # is never in a hole; a NaN pixel may be, and then the pass declines.
            done, labels, counts, regions = _fill_label_regions(
                mask, self.connectivity, scored, not_nan, select, self.min_area, self.max_regions
            )
            if done:
                return scored, xc, allowed, thr, labels, counts, regions, True
            if closed and not gate_closed:
                mask = mask & gate
        if self.fill_holes:
            mask = fill_holes(mask) & gate
        if self.dilate_ksize > 0:
            mask = dilate_ellipse(mask, self.dilate_ksize) & gate
        if with_stats:
            labels, counts, regions = _label_regions(mask, self.connectivity, scored)
            return scored, xc, allowed, thr, labels, counts, regions, False
        labels, counts = connected_components(mask, self.connectivity)
        return scored, xc, allowed, thr, labels, counts, None, False

    def _image(
        self,
        xc: Tensor,
        allowed: Tensor,
        num_regions: Tensor,
        image_score: Optional[Tensor],
        clean: bool = False,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(roi_max, roi_mean, image_score, image_label)``; ``clean``: ``xc`` is known to
        hold no NaN (the fused labeling checked it), so without an ROI nothing is masked."""
        batch, height, width = xc.shape[0], xc.shape[2], xc.shape[3]
        values = xc.reshape(batch, height * width)
        if clean and not self.has_roi:
            # _masked_stats with every pixel valid, the same reductions.
            roi_max = values.amax(1)
            if roi_max.dtype != torch.float32:
                roi_max = roi_max.to(torch.float32)
            roi_mean = (values.sum(1, dtype=torch.float64) / (height * width)).to(torch.float32)
        else:
            roi_max, roi_mean = _masked_stats(values, allowed.reshape(batch, height * width))
        if image_score is None:
            score = roi_max
        else:
            score = _as_per_image(image_score, batch, "image_score").to(
                device=xc.device, dtype=torch.float32
            )
        if self.has_image_threshold:
            label = (score >= self.image_threshold.to(torch.float32)).to(torch.int64)
        else:
            label = num_regions.clamp(max=1)  # 1 when a region was reported
        return roi_max, roi_mean, score, label

    def _mm_per_image(
        self, map_to_image: Optional[Tensor], batch: int, device: torch.device
    ) -> Tensor:
        """A map pixel's ``[mm_x, mm_y]`` per image, ``pixel_size_mm * (sx, sy)``: (B, 2)."""
        if map_to_image is None:
            scale = torch.ones(batch, 2, dtype=torch.float64, device=device)
        else:
            scale = map_to_image.to(device=device, dtype=torch.float64).reshape(-1, 2)
            scale = scale.expand(batch, 2)
        return self.pixel_size_mm * scale

    def _severity(
        self,
        area: Tensor,
        bbox_xyxy: Tensor,
        score_max: Tensor,
        score_mean: Tensor,
        batch_index: Tensor,
        batch: int,
        map_to_image: Optional[Tensor],
    ) -> Tensor:
        """First matching rule per region (``N`` for none), int64 (R,); no host sync."""
        mm: Optional[Tensor] = None
        if self.has_units:
            mm = self._mm_per_image(map_to_image, batch, area.device).index_select(0, batch_index)
        feats = _feature_table(area, bbox_xyxy, score_max, score_mean, mm, self.severity_columns)
        return _first_rule(feats, self.severity_thresholds, self.severity_active)

    def _run(
        self,
        anomaly_map: Tensor,
        pixel_threshold: Optional[Tensor],
        image_score: Optional[Tensor],
        map_to_image: Optional[Tensor] = None,
    ) -> _HeadOut:
        x, xc, allowed, thr, labels, counts, stats, fused = self._labels(
            anomaly_map, pixel_threshold, True, not self.toolbox_regions
        )
        assert stats is not None
        regions = stats
        sol: Optional[Tensor] = None
        merged: Optional[Tensor] = None
        full: Optional[Tensor] = None
        if self.full_mask:
            full = self._full_mask(x, thr)
        if self.toolbox_regions:
            batch = x.shape[0]
            keep, full_sol = self._keep(labels, regions)
            keep_before = keep
            merged_into = keep
            if self.merge:
                m = merge_nearby(labels, regions, keep, batch, self.merge_gap, x)
                labels, regions, keep, merged_into = m.labels, m.regions, m.keep, m.merged_into
                if full_sol is not None:
                    # A merged group's solidity is not defined (pyimgano leaves it out).
                    full_sol = torch.where(
                        m.merged_count > 1, torch.full_like(full_sol, float("nan")), full_sol
                    )
            table_label = regions.label
            q = self.quantile
            if q is not None:
                keep = quantile_keep(regions, keep, batch, q)
            # The order and the cap only (an empty label map: finalize's per-pixel relabel in
            # int64 costs ~5 passes over the map); the head relabels through a table below.
            empty = labels[:, :, :0, :0]
            _, regions, num_regions, index = finalize_regions(
                empty, regions, keep, batch, self.sort_by, self.max_regions
            )
            labels = _keep_labels(labels, regions)
            if full_sol is not None:
                sol = full_sol.index_select(0, index)
            if self.merge:
                merged = _merged_pairs(merged_into, table_label, keep_before, index)
        elif fused:
            num_regions = counts
        else:
            labels, regions, num_regions = select_regions(
                labels, regions, x.shape[0], self.min_area, self.max_regions
            )
        roi_max, roi_mean, score, label = self._image(
            xc, allowed, num_regions, image_score, fused and not self.conditioned
        )
        severity: Optional[Tensor] = None
        image_severity: Optional[Tensor] = None
        if self.has_severity:
            batch = x.shape[0]
            n_rules = self.severity_thresholds.shape[0]
            first = self._severity(
                regions.area, regions.bbox_xyxy, regions.score_max, regions.score_mean,
                regions.batch_index, batch, map_to_image,
            )  # fmt: skip
            severity = torch.where(first >= n_rules, -1, first)
            worst = torch.full((batch,), n_rules, dtype=torch.int64, device=first.device)
            worst = worst.scatter_reduce(0, regions.batch_index, first, reduce="amin")
            image_severity = torch.where(worst >= n_rules, -1, worst)
        return _HeadOut(
            labels=labels,
            num_regions=num_regions,
            regions=regions,
            roi_max=roi_max,
            roi_mean=roi_mean,
            pixel_threshold=thr if thr.dtype == torch.float32 else thr.to(torch.float32),
            image_score=score,
            image_label=label,
            solidity=sol,
            merged_from=merged,
            severity=severity,
            image_severity=image_severity,
            full_mask=full,
        )

    def _full_mask(self, scored: Tensor, thr: Tensor) -> Tensor:
        """``Defects.mask`` for ``mask_space="full"``: the head's stages without the ROI gate,
        then the per-component filters (not ``max_regions`` nor the quantile).

        ``scored`` is the (conditioned) map regions are scored on, ``thr`` the per-image
        threshold in the comparison dtype, as :meth:`_labels` returns them.
        """
        xs = scored if scored.dtype == thr.dtype else scored.to(thr.dtype)
        not_nan = xs == xs
        if self.hysteresis:
            low, high = hysteresis_bounds(thr, self.hysteresis_low, self.hysteresis_high)
            mask = hysteresis_threshold(xs, low, high, self.connectivity, None)
        else:
            mask = binarize(xs, thr)
        if self.open_ksize > 0:
            mask = opening(mask, self.open_ksize)
        if self.close_ksize > 0:
            mask = closing(mask, self.close_ksize) & not_nan
        if self.fill_holes:
            mask = fill_holes(mask) & not_nan
        if self.dilate_ksize > 0:
            mask = dilate_ellipse(mask, self.dilate_ksize) & not_nan
        if self.full_filters:
            labels, _, regions = _label_regions(mask, self.connectivity, scored)
            keep, _ = self._keep(labels, regions)
            mask = _kept_pixels(labels, regions, keep)
        return mask

    def _keep(self, labels: Tensor, regions: Regions) -> Tuple[Tensor, Optional[Tensor]]:
        """``(keep, solidity)``: the config's region filters (:func:`region_keep`); the
        solidity (per region) only when ``min_solidity`` needs it, else None."""
        sol: Optional[Tensor] = None
        if self.min_solidity is not None:
            sol = self._solidity(labels, regions)
        keep = region_keep(
            regions,
            self.min_area,
            self.min_score_max,
            self.min_score_mean,
            self.min_fill_ratio,
            self.max_aspect_ratio,
            self.min_solidity,
            sol,
        )
        return keep, sol

    @torch.jit.unused
    def _solidity(self, labels: Tensor, regions: Regions) -> Tensor:
        return _solidity(labels, regions)

    def forward(
        self,
        anomaly_map: Tensor,
        pixel_threshold: Optional[Tensor] = None,
        image_score: Optional[Tensor] = None,
        map_to_image: Optional[Tensor] = None,
    ) -> Defects:
        if not torch.jit.is_scripting():
            anomaly_map, pixel_threshold, image_score = _eager_args(
                anomaly_map, pixel_threshold, image_score
            )
            map_to_image = _eager_scale(map_to_image, anomaly_map)
        out = self._run(anomaly_map, pixel_threshold, image_score, map_to_image)
        full = out.full_mask
        if full is None:
            mask = out.labels != 0
        else:
            mask = full
        return Defects(
            mask=mask,
            labels=out.labels,
            num_regions=out.num_regions,
            regions=out.regions,
            roi_max=out.roi_max,
            roi_mean=out.roi_mean,
            pixel_threshold=out.pixel_threshold,
            image_score=out.image_score,
            image_label=out.image_label,
            solidity=out.solidity,
            merged_from=out.merged_from,
            severity=out.severity,
            image_severity=out.image_severity,
        )


def _eager_scale(map_to_image: Any, anomaly_map: Tensor) -> Optional[Tensor]:
    """``forward``'s ``map_to_image``: ``(sx, sy)`` numbers or a (2,) / (B, 2) tensor, > 0."""
    if map_to_image is None:
        return None
    if not isinstance(map_to_image, Tensor):
        if (
            not isinstance(map_to_image, (tuple, list))
            or len(map_to_image) != 2
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in map_to_image)
        ):
            raise TypeError(
                f"map_to_image must be (sx, sy) numbers or a tensor, got {map_to_image!r}"
            )
        map_to_image = torch.tensor([float(v) for v in map_to_image], dtype=torch.float64)
    batch = anomaly_map.shape[0]
    shape = list(map_to_image.shape)
    if not (shape == [2] or shape == [batch, 2]):
        raise ValueError(f"map_to_image must have shape [2] or [{batch}, 2], got {shape}")
    if not map_to_image.is_floating_point():
        map_to_image = map_to_image.to(torch.float64)
    if not _is_tracing() and not bool((torch.isfinite(map_to_image) & (map_to_image > 0)).all()):
        raise ValueError(f"map_to_image must be finite and > 0, got {map_to_image.tolist()}")
    return map_to_image


def _eager_args(anomaly_map: Any, pixel_threshold: Any, image_score: Any) -> Tuple[Any, Any, Any]:
    """Python-side argument checks and conversions of ``forward`` (skipped when scripted)."""
    _check_tensor(anomaly_map, "anomaly_map")
    pixel_threshold = _number_or_tensor(pixel_threshold, "pixel_threshold")
    if pixel_threshold is not None:
        _check_finite_values(pixel_threshold, "pixel_threshold", allow_inf=True)
    if image_score is not None:
        _check_tensor(image_score, "image_score")
        if not image_score.is_floating_point():
            raise TypeError(f"image_score must be a float tensor, got {str(image_score.dtype)}")
    return anomaly_map, pixel_threshold, image_score


class StaticDefectHead(DefectHead):
    """The :class:`DefectHead` that ``DefectHead(cfg, static_output=True)`` builds.

    Its forward returns :class:`StaticDefects`.

    Args:
        config: the settings; ``config.max_regions`` is the capacity ``K`` and is required.
        static_output: must be True (present so both spellings construct the same module).

    Example:
        >>> head = DefectHead(DefectsConfig(pixel_threshold=0.5, max_regions=4), static_output=True)
        >>> out = head(torch.rand(2, 1, 32, 32))
        >>> out.boxes.shape, out.score_max.shape, out.num_regions.shape
        (torch.Size([2, 4, 4]), torch.Size([2, 4]), torch.Size([2]))
    """

    capacity: Final[int]
    # Redeclared: TorchScript reads a module's own class annotations (an empty list needs one).
    severity_columns: List[int]
    severity_names: List[str]

    def __init__(self, config: DefectsConfig, static_output: bool = True) -> None:
        if static_output is not True:
            raise ValueError("StaticDefectHead needs static_output=True; use DefectHead instead")
        super().__init__(config, static_output=True)
        assert config.max_regions is not None
        self.capacity = config.max_regions
        # The traced static forward (torch.export, ONNX) runs the map conditioning, hysteresis,
        # dilation and the score and shape filters; these stages (and mask_space "full", a
        # second labeling) have no static form yet.
        for name, value, neutral in (
            ("min_solidity", config.min_solidity, None),
            ("merge_nearby_enabled", self.merge, False),
            ("min_score_max_quantile", config.min_score_max_quantile, None),
            ("max_regions_sort_by", config.max_regions_sort_by, "score_max"),
            ("mask_space", config.mask_space, "roi"),
        ):
            if value != neutral:
                shown = config.merge_nearby_enabled if name == "merge_nearby_enabled" else value
                raise ValueError(
                    f"{name}={json.dumps(shown)} is not supported in exported heads "
                    f"(static_output=True) yet; use the dynamic DefectHead or set it to "
                    f"{json.dumps(neutral)}"
                )

    def forward(  # type: ignore[override]
        self,
        anomaly_map: Tensor,
        pixel_threshold: Optional[Tensor] = None,
        image_score: Optional[Tensor] = None,
        map_to_image: Optional[Tensor] = None,
    ) -> StaticDefects:
        if not torch.jit.is_scripting():
            anomaly_map, pixel_threshold, image_score = _eager_args(
                anomaly_map, pixel_threshold, image_score
            )
            map_to_image = _eager_scale(map_to_image, anomaly_map)
            if _is_tracing():
                return self._forward_static(anomaly_map, pixel_threshold, image_score, map_to_image)
        out = self._run(anomaly_map, pixel_threshold, image_score, map_to_image)
        boxes, area, label, centroid, score_max, score_mean = _pad_regions(
            out.regions, out.num_regions, self.capacity
        )
        batch = out.num_regions.shape[0]
        region_severity = out.severity
        image_severity_out = out.image_severity
        if region_severity is not None and image_severity_out is not None:
            severity = _pad_classes(
                region_severity, out.regions.batch_index, out.num_regions, self.capacity
            )
            image_severity = image_severity_out
        else:
            severity = torch.full(
                (batch, self.capacity), -1, dtype=torch.int64, device=out.num_regions.device
            )
            image_severity = torch.full(
                (batch,), -1, dtype=torch.int64, device=out.num_regions.device
            )
        return StaticDefects(
            mask=out.labels != 0,
            labels=out.labels,
            num_regions=out.num_regions,
            boxes=boxes,
            area=area,
            label=label,
            centroid=centroid,
            score_max=score_max,
            score_mean=score_mean,
            roi_max=out.roi_max,
            roi_mean=out.roi_mean,
            pixel_threshold_used=out.pixel_threshold,
            image_score=out.image_score,
            image_label=out.image_label,
            severity=severity,
            image_severity=image_severity,
        )

    @torch.jit.unused
    def _forward_static(
        self,
        anomaly_map: Tensor,
        pixel_threshold: Optional[Tensor] = None,
        image_score: Optional[Tensor] = None,
        map_to_image: Optional[Tensor] = None,
    ) -> StaticDefects:
        """The forward that torch.export and torch.compile trace: no data-dependent size.

        Statistics go into a per-image table indexed by label (every label of an image is
        below ``H * W``), the selection is a per-image sort of that table, and the first
        ``K`` entries are the output. Same results as the eager forward (integers bit-equal;
        ``score_mean`` sums in another order, so equal to float32 rounding).
        """
        x, xc, allowed, thr, labels, _, _, _ = self._labels(anomaly_map, pixel_threshold, False)
        filters = (self.min_score_max, self.min_score_mean, self.min_fill_ratio)
        out = _static_regions(
            labels, x, self.min_area, self.capacity, filters + (self.max_aspect_ratio,)
        )
        labels_kept, num_regions, boxes, area, label, centroid, score_max, score_mean = out
        roi_max, roi_mean, score, image_label = self._image(xc, allowed, num_regions, image_score)
        batch, k = boxes.shape[0], self.capacity
        used = torch.arange(k, device=boxes.device).unsqueeze(0) < num_regions.unsqueeze(1)
        if self.has_severity:
            # The padded rows' own values, the padding masked: the same classes as the eager
            # forward's (a ``min_score_mean`` rule sees score_mean to float32 rounding).
            n_rules = self.severity_thresholds.shape[0]
            rows = torch.arange(batch, device=boxes.device).unsqueeze(1).expand(batch, k)
            first = self._severity(
                area.reshape(-1), boxes.reshape(-1, 4), score_max.reshape(-1),
                score_mean.reshape(-1), rows.reshape(-1), batch, map_to_image,
            ).view(batch, k)  # fmt: skip
            first = torch.where(used, first, n_rules)
            worst = first.amin(1)
            severity = torch.where(first >= n_rules, -1, first)
            image_severity = torch.where(worst >= n_rules, -1, worst)
        else:
            severity = torch.full_like(area, -1)
            image_severity = torch.full_like(num_regions, -1)
        return StaticDefects(
            mask=labels_kept != 0,
            labels=labels_kept,
            num_regions=num_regions,
            boxes=boxes,
            area=area,
            label=label,
            centroid=centroid,
            score_max=score_max,
            score_mean=score_mean,
            roi_max=roi_max,
            roi_mean=roi_mean,
            pixel_threshold_used=thr.to(torch.float32),
            image_score=score,
            image_label=image_label,
            severity=severity,
            image_severity=image_severity,
        )


def _static_regions(
    labels: Tensor,
    anomaly_map: Tensor,
    min_area: int,
    capacity: int,
    filters: Tuple[Optional[float], Optional[float], Optional[float], Optional[float]] = (
        None,
        None,
        None,
        None,
    ),
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Region stats and selection with static shapes (see ``StaticDefectHead._forward_static``).

    Returns ``(labels, num_regions, boxes, area, label, centroid, score_max, score_mean)`` as
    in :class:`StaticDefects`. Table column ``j`` of image ``b`` holds label ``j`` (0 is the
    background, never selected); ``capacity`` spare columns keep ``K`` columns even for maps
    with fewer pixels. Scatters with a reduction (ONNX ``ScatterElements``) handle repeated
    indices, which ``index_add`` translated to ``ScatterND`` does not.
    """
    b, h, w = labels.shape[0], labels.shape[-2], labels.shape[-1]
    n = h * w
    # An image has at most ceil(n / 2) components (a 4-connected checkerboard): labels fit.
    width = (n + 1) // 2 + 1 + capacity
    device = labels.device
    lab = labels.reshape(b, n).to(torch.int64)
    index = (lab + torch.arange(b, device=device).unsqueeze(1) * width).reshape(-1)
    size = b * width
    pos = torch.arange(n, device=device)
    row = torch.div(pos, w, rounding_mode="floor")
    xs = (pos - row * w).expand(b, n).reshape(-1)
    ys = row.expand(b, n).reshape(-1)
    i64 = torch.int64
    ones = torch.ones(b * n, dtype=i64, device=device)
    area = torch.zeros(size, dtype=i64, device=device).scatter_add(0, index, ones)
    x1 = torch.full((size,), w, dtype=i64, device=device).scatter_reduce(0, index, xs, "amin")
    x2 = torch.full((size,), -1, dtype=i64, device=device).scatter_reduce(0, index, xs, "amax")
    y1 = torch.full((size,), h, dtype=i64, device=device).scatter_reduce(0, index, ys, "amin")
    y2 = torch.full((size,), -1, dtype=i64, device=device).scatter_reduce(0, index, ys, "amax")
    sum_x = torch.zeros(size, dtype=i64, device=device).scatter_add(0, index, xs)
    sum_y = torch.zeros(size, dtype=i64, device=device).scatter_add(0, index, ys)
    score_dtype = torch.float64 if anomaly_map.dtype == torch.float64 else torch.float32
    values = anomaly_map.reshape(-1).to(score_dtype)
    fg = lab.reshape(-1) != 0
    # Background pixels (NaN included) go to column 0 but must not poison a region: mask them.
    values = torch.where(fg, values, torch.zeros_like(values))
    smax = torch.full((size,), float("-inf"), dtype=score_dtype, device=device)
    smax = smax.scatter_reduce(0, index, values, "amax")
    ssum = torch.zeros(size, dtype=torch.float64, device=device)
    ssum = ssum.scatter_add(0, index, values.to(torch.float64))

    col = torch.arange(width, device=device).unsqueeze(0)
    area2 = area.view(b, width)
    valid = (area2 >= max(min_area, 1)) & (col > 0)
    # region_keep's filters (pyimgano's strict comparisons), on the table.
    min_score_max, min_score_mean, min_fill_ratio, max_aspect_ratio = filters
    if min_score_max is not None:
        valid = valid & ~(smax.view(b, width) < min_score_max)
    if min_score_mean is not None:
        mean = ssum / area.to(torch.float64).clamp(min=1)
        valid = valid & ~(mean.to(score_dtype).view(b, width) < min_score_mean)
    if min_fill_ratio is not None or max_aspect_ratio is not None:
        bw = (x2 - x1 + 1).to(torch.float64).view(b, width)
        bh = (y2 - y1 + 1).to(torch.float64).view(b, width)
        if min_fill_ratio is not None:
            valid = valid & ~(area2.to(torch.float64) / (bw * bh) < min_fill_ratio)
        if max_aspect_ratio is not None:
            valid = valid & ~(torch.maximum(bw / bh, bh / bw) > max_aspect_ratio)
    # Selection, K rounds of "the best left": score_max desc, then area desc, then label asc.
    # ``tie`` is unique per column and orders area desc, label asc, so each round's argmax
    # is exact; no sort (ONNX has no stable sort) and K small static loops.
    # Entries already picked (and invalid ones) get score -inf and tie key -1: a valid region
    # always beats them, even one whose score is -inf.
    score2 = torch.where(valid, smax.view(b, width), float("-inf"))
    tie = torch.where(valid, area2 * width + (width - 1 - col), -1)
    picks: List[Tensor] = []
    for _ in range(capacity):
        best = score2.amax(1, True)
        pick = torch.where(score2 == best, tie, -1).argmax(1, keepdim=True)
        picks.append(pick)
        score2.scatter_(1, pick, float("-inf"))
        tie.scatter_(1, pick, -1)
    top = torch.cat(picks, 1)
    num_regions = valid.sum(1).clamp(max=capacity)
    rank = torch.arange(capacity, device=device).unsqueeze(0)
    used = rank < num_regions.unsqueeze(1)
    zero = torch.zeros_like(top)

    def take(table: Tensor) -> Tensor:
        t = table.view(b, width).gather(1, top)
        return torch.where(used, t, torch.zeros_like(t))

    t_area = take(area)
    boxes = torch.stack([take(x1), take(y1), take(x2), take(y2)], 2)
    denom = t_area.to(torch.float64).clamp(min=1)
    centroid = torch.stack(
        [take(sum_x).to(torch.float64) / denom, take(sum_y).to(torch.float64) / denom], 2
    )
    score_max = take(smax).to(torch.float32)
    score_mean = (take(ssum) / denom).to(torch.float32)
    label = torch.where(used, top, zero)
    # The mask keeps the selected labels only.
    keep = torch.zeros(b, width, dtype=torch.bool, device=device).scatter(1, top, used)
    kept = keep.gather(1, lab)
    labels_kept = torch.where(kept, lab, torch.zeros_like(lab)).to(labels.dtype).view(labels.shape)
    return (
        labels_kept,
        num_regions,
        boxes,
        t_area,
        label,
        centroid.to(torch.float32),
        score_max,
        score_mean,
    )
