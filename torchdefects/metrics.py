"""``DefectMetrics``: pixel, region and image metrics against ground-truth masks, streaming.

Definitions (``docs/evaluation.md`` has the worked example):

- **Evaluated pixels**: the pixels inside the config's ROI whose map value is not NaN.
  Pixels outside the ROI and NaN pixels are in no pixel metric (they are neither
  positives nor negatives). A ground-truth pixel is *positive*, every other evaluated
  pixel *negative*.
- **Pixel metrics at the configured settings**: the head's output mask (threshold, ROI,
  morphology, min_area, max_regions: what the head reports) against the ground truth, on
  the evaluated pixels: precision, recall, F1 and IoU from exact integer counts.
- **Threshold-free pixel metrics**: ``pixel_auroc`` is the area under the ROC curve of
  ``map >= t`` over every distinct value ``t`` (sklearn's ``roc_auc_score``, ties included
  as its trapezoid does). ``pixel_aupro`` is the MVTec AD AUPRO: for each threshold, PRO is
  the mean over ground-truth defects (8-connected components of the ground truth inside the
  ROI, over all images) of the fraction of the defect's evaluated pixels at or above the
  threshold, and FPR the fraction of negative pixels at or above it; the curve starts at
  (0, 0), the area is integrated with the trapezoid rule up to FPR = ``fpr_limit`` (0.3),
  with PRO linearly interpolated at exactly ``fpr_limit`` when no threshold lands on it, and
  divided by ``fpr_limit`` so that a perfect map scores 1.
- **Region metrics** (the whole head: threshold, morphology, min_area, filters): a
  ground-truth defect (an 8-connected component of the ground truth inside the ROI) is
  *found* when a reported region overlaps it by at least one pixel; ``region_recall`` is
  found / defects. A reported region that overlaps no ground-truth pixel is a *false alarm*;
  ``region_precision`` is (reported - false alarms) / reported. The ``_iou50`` variants
  match a defect and a region only when their IoU (pixel sets) is ``>= 0.5``.
  ``false_alarms_per_normal_image`` counts the false alarms in normal images divided by
  the number of normal images.
- **Image metrics**: the image score is the head's ``roi_max`` (the max of the map over the
  ROI); an image is defective when its ground truth has any pixel (anywhere, ROI or not)
  unless ``image_labels`` are given. ``image_auroc`` over the images whose score is not NaN;
  ``image_f1`` at the head's image decision (``score >= config.image_threshold``, or "has a
  reported region" when ``image_threshold`` is ``None``); ``image_best_f1`` and its
  threshold over every distinct score (ties: the lowest threshold).

Memory. The threshold-free metrics keep, on the input's device, the distinct values of the
negative pixels with their counts (16 bytes each: an int64 order-preserving key and an
int64 count) and the distinct (value, defect size) pairs of the positive pixels with their
counts (24 bytes each). Batches are summarised with ``torch.unique`` and merged into the
state when the pending summaries outgrow it (so every pixel is sorted O(log) times), so
the peak is about twice the state plus one batch. That is exact, and bounded by the number
of distinct values: a float32 map has at most 2^32 of them, and random float maps of
2,000 x 256 x 256 pixels take about 2 GB. ``bins`` makes it bounded whatever the data:
``bins=m`` rounds every value *down* to ``m`` mantissa bits (a monotone bucketing that
needs no range: at most ``2**(9 + m)`` buckets for float32), so every threshold that is a
bucket edge keeps its exact counts; the areas are then trapezoids through a subset of the
exact curve's points and their error is reported: ``pixel_auroc_error_bound`` =
0.5 * sum over buckets of pos_b * neg_b / (P * N), and ``pixel_aupro_error_bound`` =
(0.5 * sum over the buckets below the FPR limit of fpr_b * pro_b, plus fpr_b * pro_b of the
bucket that straddles the limit) / fpr_limit (0 in exact mode).
"""

import math
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from torchdefects._check import _as_b1hw, _check_bool_mask, _check_float_map
from torchdefects.components import connected_components
from torchdefects.config import DefectsConfig
from torchdefects.head import DefectHead, Defects
from torchdefects.roi import roi_mask, roi_tensor

__all__ = ["DefectMetrics", "PixelCurve", "float_keys", "keys_to_float", "trapezoid_to"]

# Merge pending batch summaries into the state once they hold this many entries, or as
# many as the state, whichever is larger.
_MIN_MERGE = 1 << 20


# ----------------------------------------------------------------------------
# Order-preserving integer keys of floats
# ----------------------------------------------------------------------------


def float_keys(values: Tensor) -> Tensor:
    """int64 keys with the order of the float values: ``a < b`` iff ``key(a) < key(b)``.

    ``-0.0`` and ``0.0`` get the same key (they compare equal); NaN must be removed first.
    float32 values (float16/bfloat16 are upcast exactly) give keys in the int32 range,
    float64 values use the whole int64 range.

    Example:
        >>> float_keys(torch.tensor([-1.0, -0.0, 0.0, 2.0])).tolist()
        [-1065353217, 0, 0, 1073741824]
    """
    if values.dtype == torch.float64:
        bits = (values + 0.0).view(torch.int64)
        return torch.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits)
    bits32 = (values.to(torch.float32) + 0.0).view(torch.int32)
    return torch.where(bits32 < 0, bits32 ^ 0x7FFFFFFF, bits32).to(torch.int64)


def keys_to_float(keys: np.ndarray, double: bool) -> np.ndarray:
    """The float values of keys made by :func:`float_keys` (NumPy, on the host)."""
    keys = np.asarray(keys, dtype=np.int64)
    if double:
        bits = np.where(keys < 0, keys ^ 0x7FFFFFFFFFFFFFFF, keys)
        return bits.view(np.float64)
    bits32 = np.where(keys < 0, keys ^ 0x7FFFFFFF, keys).astype(np.int32)
    return bits32.view(np.float32).astype(np.float64)


def _bucket(keys: Tensor, shift: int, double: bool) -> Tensor:
    """Round keys down to a multiple of ``2**shift``: the value down to fewer mantissa bits."""
    if shift == 0:
        return keys
    edge = (keys >> shift) << shift
    # The bucket of -inf would start at a NaN pattern; -inf is its own lowest value.
    lowest = -0x7FF0000000000001 if double else -0x7F800001
    return torch.clamp(edge, min=lowest)


def _unique_counts(cols: List[Tensor], counts: Optional[Tensor]) -> Tuple[List[Tensor], Tensor]:
    """Sorted unique rows of int64 columns (the first most significant) and their counts.

    ``counts`` (int64, one per row) are summed per unique row; ``None`` counts each row once.
    CPU tensors go through NumPy (a stable sort of already sorted runs is a merge, and
    torch's CPU sort is slower); other devices use ``torch.unique``. Integer sums are exact,
    so the result is the same whatever the order of the rows.
    """
    device = cols[0].device
    n = cols[0].numel()
    if device.type == "cpu":
        c = [t.numpy() for t in cols]
        cols.clear()  # the caller's list: its arrays are freed once sorted copies exist
        order = None
        if counts is None and len(c) == 1:
            c = [np.sort(c[0])]  # no payload to carry: a plain (SIMD) sort
        else:
            # Stable: runs that are already sorted (the state, the batch summaries) merge.
            order = np.argsort(c[0], kind="stable") if len(c) == 1 else np.lexsort(c[::-1])
            c = [a[order] for a in c]
        if n == 0:
            return [torch.from_numpy(a) for a in c], torch.zeros(0, dtype=torch.int64)
        change = np.zeros(n, dtype=bool)
        change[0] = True
        for a in c:
            change[1:] |= a[1:] != a[:-1]
        starts = np.flatnonzero(change)
        if counts is None:
            summed = np.diff(np.append(starts, n)).astype(np.int64)
        else:
            assert order is not None
            weights = counts.numpy()[order]
            del counts, order
            summed = np.add.reduceat(weights, starts).astype(np.int64)
        return [torch.from_numpy(np.ascontiguousarray(a[starts])) for a in c], torch.from_numpy(
            summed
        )
    if len(cols) == 1:
        u, inv = torch.unique(cols[0], return_inverse=True)
        rows = [u]
    else:
        u, inv = torch.unique(torch.stack(cols, 1), dim=0, return_inverse=True)
        rows = [u[:, j].contiguous() for j in range(len(cols))]
    ones = torch.ones(n, dtype=torch.int64, device=device) if counts is None else counts
    summed = torch.zeros(rows[0].numel(), dtype=torch.int64, device=device).index_add_(0, inv, ones)
    return rows, summed


# ----------------------------------------------------------------------------
# Curves
# ----------------------------------------------------------------------------


def trapezoid_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under the polyline (x, y) (x non-decreasing) from x[0] up to ``x_max``.

    When no point has ``x == x_max`` the polyline is cut at ``x_max`` with ``y`` linearly
    interpolated between its neighbours, as the MVTec AD evaluation code does. Points past
    ``x_max`` are ignored; if the polyline ends before ``x_max`` the area stops there.

    Example:
        >>> trapezoid_to(np.array([0.0, 1.0]), np.array([0.0, 1.0]), 0.5)
        0.125
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    inside = x <= x_max
    xi, yi = x[inside], y[inside]
    area = float(np.sum(0.5 * (yi[1:] + yi[:-1]) * (xi[1:] - xi[:-1]))) if xi.size > 1 else 0.0
    after = int(np.count_nonzero(inside))
    if 0 < after < x.size and xi[-1] < x_max:
        x0, y0, x1, y1 = xi[-1], yi[-1], x[after], y[after]
        y_cut = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_cut) * (x_max - x0)
    return float(area)


class PixelCurve:
    """The exact pixel curve: per distinct threshold, the pixels at or above it.

    Attributes:
        thresholds: float64 :math:`(T,)`, distinct values in *decreasing* order (bucket
            edges in binned mode).
        tp: int64 :math:`(T,)`, positive pixels ``>= thresholds[i]``.
        fp: int64 :math:`(T,)`, negative pixels ``>= thresholds[i]``.
        pro: float64 :math:`(T,)`, PRO at ``thresholds[i]`` (NaN without defects).
        positives, negatives: totals (``tp[-1]``, ``fp[-1]``).
        defects: number of ground-truth defects with an evaluated pixel.
    """

    def __init__(
        self, thresholds: np.ndarray, tp: np.ndarray, fp: np.ndarray, pro: np.ndarray, defects: int
    ) -> None:
        self.thresholds = thresholds
        self.tp = tp
        self.fp = fp
        self.pro = pro
        self.defects = defects
        self.positives = int(tp[-1]) if tp.size else 0
        self.negatives = int(fp[-1]) if fp.size else 0

    def counts_at(self, threshold: float) -> Tuple[int, int]:
        """``(tp, fp)`` of ``map >= threshold`` (exact in exact mode)."""
        # thresholds decrease: the number of thresholds >= threshold.
        i = int(np.searchsorted(-self.thresholds, -threshold, side="right"))
        if i == 0:
            return 0, 0
        return int(self.tp[i - 1]), int(self.fp[i - 1])

    def f1(self) -> np.ndarray:
        """Pixel F1 at each threshold, float64 (0 where nothing is positive or predicted)."""
        fn = self.positives - self.tp
        den = 2 * self.tp + self.fp + fn
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(den > 0, 2.0 * self.tp / np.maximum(den, 1), 0.0)
        return out

    def auroc(self) -> Tuple[float, float]:
        """(AUROC, error bound of binning); NaN without positives or negatives."""
        p, n = self.positives, self.negatives
        if p == 0 or n == 0:
            return float("nan"), 0.0
        pos = np.diff(self.tp, prepend=0)
        neg = np.diff(self.fp, prepend=0)
        tp_before = self.tp - pos
        # Twice the area times P*N is an integer: sum of neg_i * (tp_before_i + tp_i).
        if p * n < (1 << 61):
            twice = int(np.sum(neg * (2 * tp_before + pos), dtype=np.int64))
            ties = int(np.sum(neg * pos, dtype=np.int64))
        else:  # too many pixels for int64 products: float64 sums
            twice = float(np.sum(neg.astype(np.float64) * (2 * tp_before + pos)))
            ties = float(np.sum(neg.astype(np.float64) * pos))
        return twice / (2 * p * n), ties / (2 * p * n)

    def aupro(self, fpr_limit: float) -> Tuple[float, float]:
        """(normalised AUPRO up to ``fpr_limit``, error bound of binning)."""
        if self.defects == 0 or self.negatives == 0:
            return float("nan"), 0.0
        fpr = np.concatenate([[0.0], self.fp / self.negatives])
        pro = np.concatenate([[0.0], np.minimum(self.pro, 1.0)])
        area = trapezoid_to(fpr, pro, fpr_limit) / fpr_limit
        dfpr, dpro = np.diff(fpr), np.diff(pro)
        # Inside a bucket the exact curve is a monotone path across the bucket's rectangle:
        # the chord is within half the rectangle of it over the whole bucket, and within the
        # whole rectangle over the part before the cut of the bucket that straddles the limit.
        rect = dfpr * dpro
        inside = fpr[1:] <= fpr_limit
        straddle = (fpr[:-1] < fpr_limit) & (fpr[1:] > fpr_limit)
        bound = float((0.5 * np.sum(rect[inside]) + np.sum(rect[straddle])) / fpr_limit)
        return area, bound


def _ratio(num: int, den: int) -> Optional[float]:
    return num / den if den > 0 else None


def _prf(tp: int, fp: int, fn: int) -> Dict[str, Any]:
    return {
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "iou": _ratio(tp, tp + fp + fn),
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


def _none_if_nan(x: float) -> Optional[float]:
    return None if math.isnan(x) else float(x)


def best_f1_threshold(
    scores: np.ndarray, labels: np.ndarray
) -> Tuple[Optional[float], Optional[float], int]:
    """Threshold maximising F1 of ``scores >= t`` over the distinct scores; ties: the lowest.

    NaN scores are never predicted positive (they count in the positives' total when
    labelled). Returns ``(threshold, f1, index)``; ``(None, None, -1)`` without positives.
    """
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    p = int(labels.sum())
    ok = ~np.isnan(scores)
    if p == 0 or not ok.any():
        return None, None, -1
    s, y = scores[ok], labels[ok]
    thr, inv = np.unique(-s, return_inverse=True)  # decreasing thresholds
    pos = np.bincount(inv, weights=y, minlength=thr.size).astype(np.int64)
    neg = np.bincount(inv, weights=~y, minlength=thr.size).astype(np.int64)
    tp, fp = np.cumsum(pos), np.cumsum(neg)
    i = _argmax_f1(tp, fp, p)
    return float(-thr[i]), 2 * int(tp[i]) / (int(tp[i]) + int(fp[i]) + p), i


def _argmax_f1(tp: np.ndarray, fp: np.ndarray, positives: int) -> int:
    """Index of the largest F1 = 2tp/(tp+fp+P), exactly; ties: the largest index.

    The arrays run over decreasing thresholds, so the largest index is the lowest threshold.
    Candidates within float rounding of the float64 maximum are compared exactly as fractions.
    """
    den = tp + fp + positives
    f1 = 2.0 * tp / np.maximum(den, 1)
    top = f1.max()
    cand = np.flatnonzero(f1 >= top * (1 - 1e-12))
    best = int(cand[-1])
    for i in cand[::-1]:
        i = int(i)
        # tp_i/den_i > tp_best/den_best, in integers (Python ints: no overflow).
        if int(tp[i]) * int(den[best]) > int(tp[best]) * int(den[i]):
            best = i
    return best


# ----------------------------------------------------------------------------
# The metric
# ----------------------------------------------------------------------------


class DefectMetrics:
    """Pixel, region and image metrics of a defect head against ground truth, streaming.

    torchmetrics style: :meth:`update` per batch, :meth:`compute` once, :meth:`reset`.
    Counts are exact integers; the state lives on the device of the first batch. See the
    module docstring for every definition and the memory bound.

    Args:
        config: a :class:`~torchdefects.DefectsConfig` or a :class:`~torchdefects.DefectHead`
            (its config is used). The head is run by :meth:`update` unless ``defects`` is
            given. ``None`` (or a config without ``pixel_threshold``) computes the
            threshold-free metrics only.
        fpr_limit: the FPR up to which AUPRO is integrated (MVTec AD: 0.3).
        bins: ``None`` for the exact curve; an int ``m`` in 1..22 rounds values down to
            ``m`` mantissa bits (bounded memory, see the module docstring).
        iou_match: the IoU a region and a defect need for the ``_iou50`` variants.
        threshold_free: keep the pixel curve (AUROC, AUPRO, best F1); ``False`` keeps only
            the counts at the configured settings (what a threshold sweep needs).

    Shape:
        - anomaly_map: :math:`(B, 1, H, W)` or :math:`(B, H, W)`, float.
        - gt_mask: bool, same shape.
        - image_labels: bool or int :math:`(B,)`, optional.

    Example:
        >>> m = DefectMetrics(DefectsConfig(pixel_threshold=0.5))
        >>> amap = torch.tensor([[[0.9, 0.1], [0.2, 0.7]]])
        >>> gt = torch.tensor([[[True, False], [False, False]]])
        >>> m.update(amap, gt)
        >>> r = m.compute()
        >>> r["pixel"]["precision"], r["pixel_auroc"], r["region"]["recall"]
        (0.5, 1.0, 1.0)
    """

    def __init__(
        self,
        config: Union[DefectsConfig, DefectHead, None] = None,
        fpr_limit: float = 0.3,
        bins: Optional[int] = None,
        iou_match: float = 0.5,
        threshold_free: bool = True,
    ) -> None:
        head: Optional[DefectHead] = None
        if isinstance(config, DefectHead):
            head, config = config, config.config
        elif config is not None and not isinstance(config, DefectsConfig):
            raise TypeError(
                f"config must be a DefectsConfig, a DefectHead or None, got {type(config).__name__}"
            )
        if isinstance(fpr_limit, bool) or not isinstance(fpr_limit, (int, float)):
            raise TypeError(f"fpr_limit must be a number, got {fpr_limit!r}")
        if not 0.0 < float(fpr_limit) <= 1.0:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        if bins is not None and (isinstance(bins, bool) or not isinstance(bins, int)):
            raise TypeError(f"bins must be an int or None, got {bins!r}")
        if bins is not None and not 1 <= bins <= 22:
            raise ValueError(f"bins must be in 1..22 (mantissa bits kept) or None, got {bins}")
        if not 0.0 < float(iou_match) <= 1.0:
            raise ValueError(f"iou_match must be in (0, 1], got {iou_match}")
        self.config = config
        if head is None and config is not None and config.pixel_threshold is not None:
            head = DefectHead(config)
        self.head = head
        self.fpr_limit = float(fpr_limit)
        self.bins = bins
        self.iou_match = float(iou_match)
        self.threshold_free = bool(threshold_free)
        self.roi = None if config is None else config.roi_xyxy_norm
        self.reset()

    def reset(self) -> None:
        """Forget every update."""
        self._device: Optional[torch.device] = None
        self._double: Optional[bool] = None
        # (sorted unique key columns, counts); no columns until the first merge.
        empty: Tuple[List[Tensor], Tensor] = ([], torch.zeros(0, dtype=torch.int64))
        self._neg = empty
        self._pos = empty
        self._pending_neg: List[Tuple[List[Tensor], Tensor]] = []
        self._pending_pos: List[Tuple[List[Tensor], Tensor]] = []
        self._pending_size = 0
        self._defects = 0
        self._pixel = torch.zeros(4, dtype=torch.int64)  # tp, fp, fn, tn
        self._region = torch.zeros(8, dtype=torch.int64)
        self._scores: List[Tensor] = []
        self._labels: List[Tensor] = []
        self._decisions: List[Tensor] = []
        self._images = 0
        self._nan_pixels = 0

    # -- update ---------------------------------------------------------------

    def update(
        self,
        anomaly_map: Tensor,
        gt_mask: Tensor,
        image_labels: Optional[Tensor] = None,
        defects: Optional[Defects] = None,
    ) -> None:
        """Add a batch.

        Args:
            anomaly_map: :math:`(B, 1, H, W)` or :math:`(B, H, W)` float map.
            gt_mask: bool, the same shape: ground-truth defect pixels.
            image_labels: :math:`(B,)` bool/int (nonzero = defective); default: the
                ground truth has a pixel.
            defects: the head's output for this batch, if already computed (it must come
                from the same settings); else the head is run here.

        Raises:
            TypeError, ValueError: bad dtype or shape; the message names the argument.
        """
        _check_float_map(anomaly_map, "anomaly_map")
        _check_bool_mask(gt_mask, "gt_mask")
        x = _as_b1hw(anomaly_map, "anomaly_map").detach()
        gt = _as_b1hw(gt_mask, "gt_mask")
        if gt.shape != x.shape:
            raise ValueError(
                f"gt_mask must have the shape of anomaly_map {list(x.shape)}, got {list(gt.shape)}"
            )
        if gt.device != x.device:
            raise ValueError(
                f"gt_mask must be on the device of anomaly_map ({x.device}), got {gt.device}"
            )
        batch, h, w = x.shape[0], x.shape[2], x.shape[3]
        if h == 0 or w == 0:
            raise ValueError(f"anomaly_map must have H > 0 and W > 0, got {list(x.shape)}")
        double = x.dtype == torch.float64
        if self._device is None:
            self._device, self._double = x.device, double
            self._move_state(x.device)
        elif x.device != self._device:
            raise ValueError(
                f"anomaly_map must be on {self._device} like the earlier batches, got {x.device}"
            )
        elif double != self._double:
            raise ValueError(
                "anomaly_map must keep its precision across updates: earlier batches were "
                f"{'float64' if self._double else 'float32'}, got {x.dtype}"
            )
        if image_labels is not None:
            if not isinstance(image_labels, Tensor):
                raise TypeError(
                    f"image_labels must be a tensor or None, got {type(image_labels).__name__}"
                )
            if image_labels.shape != (batch,):
                raise ValueError(
                    f"image_labels must have shape ({batch},), got {list(image_labels.shape)}"
                )
            labels = image_labels.to(x.device) != 0
        else:
            labels = gt.flatten(1).any(1)
        if batch == 0:
            return

        valid = ~torch.isnan(x)
        if self.roi is not None:
            valid = valid & roi_mask(roi_tensor(self.roi, x.device), h, w)
        gt_eval = gt & valid
        gt_roi = gt if self.roi is None else gt & roi_mask(roi_tensor(self.roi, x.device), h, w)
        self._nan_pixels += int(torch.isnan(x).sum())

        # Defects of the ground truth (8-connectivity, as the MVTec AD evaluation code).
        gt_labels, gt_counts = connected_components(gt_roi, 8)
        if self.threshold_free:
            self._add_curve(x, gt_eval, valid, gt_labels, gt_counts)

        if self.head is not None:
            if defects is None:
                defects = self.head(x)
            self._add_thresholded(defects, gt_eval, valid, gt_labels, gt_counts, labels)
            self._scores.append(defects.roi_max.detach().to(torch.float64))
        else:
            self._scores.append(_roi_max(x, valid))
        self._labels.append(labels)
        self._images += batch

    def _move_state(self, device: torch.device) -> None:
        self._neg = ([], self._neg[1].to(device))
        self._pos = ([], self._pos[1].to(device))
        self._pixel = self._pixel.to(device)
        self._region = self._region.to(device)

    def _keys(self, values: Tensor) -> Tensor:
        keys = float_keys(values)
        if self.bins is None:
            return keys
        shift = (52 if self._double else 23) - self.bins
        return _bucket(keys, shift, bool(self._double))

    def _add_curve(
        self, x: Tensor, gt_eval: Tensor, valid: Tensor, gt_labels: Tensor, gt_counts: Tensor
    ) -> None:
        nk, nc = _unique_counts([self._keys(x[valid & ~gt_eval])], None)
        # Defect size = its evaluated pixels (NaN and outside-ROI pixels are not evaluated).
        batch = x.shape[0]
        offsets = torch.cumsum(gt_counts, 0) - gt_counts
        gid = (gt_labels.to(torch.int64) + offsets.view(batch, 1, 1, 1))[gt_eval] - 1
        total = int(gt_counts.sum())
        size = torch.bincount(gid, minlength=total) if total > 0 else gid
        self._defects += int((size > 0).sum()) if total > 0 else 0
        pk, pc = _unique_counts(self._pos_cols(self._keys(x[gt_eval]), size[gid]), None)
        self._pending_neg.append((nk, nc))
        self._pending_pos.append((pk, pc))
        self._pending_size += nk[0].numel() + pc.numel()
        if self._pending_size >= max(_MIN_MERGE, self._neg[1].numel() + self._pos[1].numel()):
            self._merge()

    def _pos_cols(self, keys: Tensor, sizes: Tensor) -> List[Tensor]:
        """Positive pixels as sortable columns: (value key, defect size).

        float32 keys fit 32 bits, so both go into one int64 (key * 2^32 + size), which
        sorts as the pair; float64 keys need two columns.
        """
        if self._double:
            return [keys, sizes]
        return [keys * (1 << 32) + sizes]

    def _split_pos(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        cols, counts = self._pos
        c = [t.cpu().numpy() for t in cols]
        if self._double:
            return c[0], c[1], counts.cpu().numpy()
        return c[0] >> 32, c[0] & 0xFFFFFFFF, counts.cpu().numpy()

    def _merge(self) -> None:
        if not self._pending_neg:
            return
        pending_of = {"_neg": self._pending_neg, "_pos": self._pending_pos}
        self._pending_neg, self._pending_pos, self._pending_size = [], [], 0
        for name, pending in pending_of.items():
            parts = [getattr(self, name)] + pending
            pending.clear()
            # Drop every other reference first, so the inputs die as soon as they are sorted.
            setattr(self, name, ([], torch.zeros(0, dtype=torch.int64, device=parts[0][1].device)))
            width = max(len(c) for c, _ in parts)
            parts = [(c, n) for c, n in parts if len(c) == width]  # the empty start state
            merged = [torch.cat([c[j] for c, _ in parts]) for j in range(width)]
            counts = torch.cat([n for _, n in parts])
            del parts
            setattr(self, name, _unique_counts(merged, counts))

    def _add_thresholded(
        self,
        d: Defects,
        gt_eval: Tensor,
        valid: Tensor,
        gt_labels: Tensor,
        gt_counts: Tensor,
        labels: Tensor,
    ) -> None:
        pred = d.mask & valid
        tp = (pred & gt_eval).sum()
        fp = (pred & ~gt_eval).sum()
        fn = (~pred & gt_eval).sum()
        tn = (valid & ~pred & ~gt_eval).sum()
        self._pixel += torch.stack([tp, fp, fn, tn])
        self._region += _region_counts(d, gt_labels, gt_counts, labels, self.iou_match)
        if self.config is not None and self.config.image_threshold is not None:
            decision = d.roi_max >= self.config.image_threshold
        else:
            decision = d.num_regions > 0
        self._decisions.append(decision)

    # -- compute --------------------------------------------------------------

    def image_scores(self) -> Tuple[np.ndarray, np.ndarray]:
        """``(scores, labels)`` of every image seen, in update order (float64, bool)."""
        if not self._scores:
            return np.zeros(0), np.zeros(0, dtype=bool)
        return torch.cat(self._scores).cpu().numpy(), torch.cat(self._labels).cpu().numpy()

    def curve(self) -> PixelCurve:
        """The pixel curve over every distinct value (bucket edge in binned mode), on the host."""
        self._merge()
        nk = self._neg[0][0].cpu().numpy() if self._neg[0] else np.zeros(0, np.int64)
        nc = self._neg[1].cpu().numpy()
        if self._pos[0]:
            pk, ps, pc = self._split_pos()
        else:
            pk = ps = pc = np.zeros(0, np.int64)
        # Both are sorted: a stable sort of the two runs is a linear merge, and the per-key
        # sums run in a fixed order (negatives, then positives by defect size): the same
        # bits whatever the batching.
        all_k = np.concatenate([nk, pk])
        order = np.argsort(all_k, kind="stable")
        all_k = all_k[order]
        if all_k.size:
            starts = np.flatnonzero(np.concatenate([[True], all_k[1:] != all_k[:-1]]))
        else:
            starts = np.zeros(0, np.int64)

        def per_key(values: np.ndarray) -> np.ndarray:
            if not starts.size:
                return values[:0]
            return np.add.reduceat(values[order], starts)[::-1]

        zeros_n, zeros_p = np.zeros(nk.size, np.int64), np.zeros(pk.size, np.int64)
        keys = all_k[starts][::-1]  # decreasing
        neg = per_key(np.concatenate([nc, zeros_p]))
        pos = per_key(np.concatenate([zeros_n, pc]))
        weight = per_key(np.concatenate([zeros_n.astype(np.float64), pc / ps.astype(np.float64)]))
        pro = np.cumsum(weight) / self._defects if self._defects else np.full(keys.size, np.nan)
        return PixelCurve(
            keys_to_float(keys, bool(self._double)),
            np.cumsum(pos),
            np.cumsum(neg),
            pro,
            self._defects,
        )

    def compute(self) -> Dict[str, Any]:
        """Every metric as a JSON-ready dict (``None`` where undefined).

        Keys: ``images``, ``normal_images``, ``defective_images``, ``pixels``
        (evaluated), ``positive_pixels``, ``nan_pixels``, ``defects``, ``pixel`` (precision,
        recall, f1, iou, tp, fp, fn at the configured settings, or ``None``),
        ``pixel_auroc``, ``pixel_aupro``, ``fpr_limit``, ``pixel_auroc_error_bound``,
        ``pixel_aupro_error_bound``, ``pixel_best_f1`` (the ``segf1`` threshold and F1),
        ``region`` (recall, precision, false alarms, ``_iou50`` variants, or ``None``),
        ``image`` (auroc, f1 at the head's decision, best f1 and its threshold), ``mode``.
        """
        c = self.curve()
        auroc, auroc_bound = c.auroc()
        aupro, aupro_bound = c.aupro(self.fpr_limit)
        scores, labels = self.image_scores()
        out: Dict[str, Any] = {
            "mode": "exact" if self.bins is None else f"binned_{self.bins}_mantissa_bits",
            "images": self._images,
            "normal_images": int((~labels).sum()),
            "defective_images": int(labels.sum()),
            "pixels": c.positives + c.negatives,
            "positive_pixels": c.positives,
            "nan_pixels": self._nan_pixels,
            "defects": c.defects,
            "pixel_auroc": _none_if_nan(auroc),
            "pixel_aupro": _none_if_nan(aupro),
            "fpr_limit": self.fpr_limit,
            # Ties of the exact curve are real ties (sklearn scores them 1/2 too): no error.
            "pixel_auroc_error_bound": 0.0 if self.bins is None else auroc_bound,
            "pixel_aupro_error_bound": 0.0 if self.bins is None else aupro_bound,
        }
        best = None
        if c.positives > 0 and c.thresholds.size:
            i = _argmax_f1(c.tp, c.fp, c.positives)
            tp, fp = int(c.tp[i]), int(c.fp[i])
            best = {"threshold": float(c.thresholds[i]), **_prf(tp, fp, c.positives - tp)}
        out["pixel_best_f1"] = best
        out["pixel"] = None
        out["region"] = None
        if self.head is not None:
            tp, fp, fn, _ = (int(v) for v in self._pixel.tolist())
            out["pixel"] = {"threshold": self.config.pixel_threshold, **_prf(tp, fp, fn)}
            out["region"] = _region_summary(self._region.tolist(), out["normal_images"])
        out["image"] = self._image_summary(scores, labels)
        return out

    def _image_summary(self, scores: np.ndarray, labels: np.ndarray) -> Dict[str, Any]:
        ok = ~np.isnan(scores)
        s, y = scores[ok], labels[ok]
        res: Dict[str, Any] = {"nan_scores": int((~ok).sum()), "auroc": None}
        if y.any() and (~y).any():
            res["auroc"] = _auroc_np(s, y)
        thr, f1, _ = best_f1_threshold(scores, labels)
        res["best_f1"] = f1
        res["best_f1_threshold"] = thr
        if self._decisions:
            pred = torch.cat(self._decisions).cpu().numpy()
            tp = int((pred & labels).sum())
            fp = int((pred & ~labels).sum())
            fn = int((~pred & labels).sum())
            res["decision"] = (
                "roi_max >= image_threshold"
                if self.config is not None and self.config.image_threshold is not None
                else "any reported region"
            )
            res.update({k: v for k, v in _prf(tp, fp, fn).items() if k != "iou"})
        return res


def _auroc_np(scores: np.ndarray, labels: np.ndarray) -> float:
    thr, inv = np.unique(-scores, return_inverse=True)
    pos = np.bincount(inv, weights=labels, minlength=thr.size).astype(np.int64)
    neg = np.bincount(inv, weights=~labels, minlength=thr.size).astype(np.int64)
    return PixelCurve(-thr, np.cumsum(pos), np.cumsum(neg), np.zeros(thr.size), 0).auroc()[0]


def _roi_max(x: Tensor, valid: Tensor) -> Tensor:
    """Max of each map over its evaluated pixels (NaN when none), float64 (B,).

    Stands in for the head's image score when no head is configured.
    """
    low = torch.full_like(x, float("-inf"))
    m = torch.where(valid, x, low).flatten(1).amax(1).to(torch.float64)
    none = ~valid.flatten(1).any(1)
    return torch.where(none, torch.full_like(m, float("nan")), m)


def _region_counts(
    d: Defects, gt_labels: Tensor, gt_counts: Tensor, labels: Tensor, iou_match: float
) -> Tensor:
    """int64 (8,): defects, found, found_iou, regions, hit regions, hit_iou, false alarms in
    normal images, false alarms in all images."""
    batch = gt_labels.shape[0]
    dev = gt_labels.device
    n_gt = int(gt_counts.sum())
    n_pred = int(d.num_regions.sum())
    g_off = torch.cumsum(gt_counts, 0) - gt_counts
    g = gt_labels.to(torch.int64).flatten(1)
    p = d.labels.to(torch.int64).flatten(1)
    # The head keeps each region's component label (not 1..n after max_regions): a region's
    # index is found by its (image, label) key among the sorted keys of the reported regions.
    stride = int(p.max()) + 1 if p.numel() else 1
    region_key = d.regions.batch_index.to(dev) * stride + d.regions.label.to(dev)
    sorted_keys, order = torch.sort(region_key)
    image = torch.arange(batch, device=dev).view(batch, 1)

    def region_of(sel: Tensor) -> Tensor:
        key = (image * stride + p)[sel]
        return order[torch.searchsorted(sorted_keys, key)]

    both = (g > 0) & (p > 0)
    gid = (g + g_off.view(batch, 1))[both] - 1
    pid = region_of(both)
    gt_area = torch.bincount((g + g_off.view(batch, 1))[g > 0] - 1, minlength=n_gt)
    pred_area = torch.bincount(region_of(p > 0), minlength=n_pred)
    pair, inter = torch.unique(gid * max(n_pred, 1) + pid, return_counts=True)
    pg, pp = pair // max(n_pred, 1), pair % max(n_pred, 1)
    iou_ok = inter.to(torch.float64) >= iou_match * (gt_area[pg] + pred_area[pp] - inter).to(
        torch.float64
    )
    found = torch.zeros(n_gt, dtype=torch.bool, device=dev)
    found[pg] = True
    found_iou = torch.zeros(n_gt, dtype=torch.bool, device=dev)
    found_iou[pg[iou_ok]] = True
    hit = torch.zeros(n_pred, dtype=torch.bool, device=dev)
    hit[pp] = True
    hit_iou = torch.zeros(n_pred, dtype=torch.bool, device=dev)
    hit_iou[pp[iou_ok]] = True
    pred_image = d.regions.batch_index.to(dev)
    false = ~hit
    false_normal = false & ~labels[pred_image]
    return torch.stack(
        [
            torch.tensor(n_gt, device=dev),
            found.sum(),
            found_iou.sum(),
            torch.tensor(n_pred, device=dev),
            hit.sum(),
            hit_iou.sum(),
            false_normal.sum(),
            false.sum(),
        ]
    ).to(torch.int64)


def _region_summary(r: List[int], normal_images: int) -> Dict[str, Any]:
    defects, found, found_iou, regions, hit, hit_iou, false_normal, false = r
    return {
        "defects": defects,
        "found": found,
        "recall": _ratio(found, defects),
        "regions": regions,
        "false_alarms": false,
        "precision": _ratio(hit, regions),
        "false_alarms_in_normal_images": false_normal,
        "false_alarms_per_normal_image": _ratio(false_normal, normal_images),
        "found_iou50": found_iou,
        "recall_iou50": _ratio(found_iou, defects),
        "precision_iou50": _ratio(hit_iou, regions),
    }
