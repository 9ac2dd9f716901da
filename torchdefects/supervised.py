"""Thresholds chosen from labelled data: ``segf1`` pixel threshold, image thresholds.

- :func:`segf1_threshold`: the pixel threshold maximising pixel F1 of ``map >= t`` over
  every distinct evaluated value ``t`` (ties: the lowest threshold), exactly, from the
  curve of a :class:`~torchdefects.DefectMetrics` (raw ``map >= t`` inside the ROI, NaN
  pixels excluded; morphology and region filters are not part of it, as in pyimgano's
  ``segf1``).
- :func:`image_threshold_f1`: the image threshold maximising image F1 of
  ``score >= t`` over the distinct image scores (ties: the lowest).
- :func:`image_threshold_normal_quantile`: the ``q``-quantile of the normal images'
  scores, exactly ``numpy.quantile(scores, q)`` (linear interpolation).

Each returns ``(threshold, provenance)``; the provenance speaks pyimgano's vocabulary:
``source`` (``train_dir``: computed from a folder of labelled data) and ``method``
(``supervised_segf1``, ``image_f1``, ``normal_quantile``), with the F1 reached and the
counts it was computed from.
"""

import math
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from torchdefects.metrics import DefectMetrics, _argmax_f1, best_f1_threshold

__all__ = [
    "image_threshold_f1",
    "image_threshold_normal_quantile",
    "segf1_threshold",
]


def segf1_threshold(
    metrics: DefectMetrics,
    source: str = "train_dir",
    roi_xyxy_norm: Optional[Sequence[float]] = None,
) -> Tuple[float, Dict[str, Any]]:
    """The pixel threshold with the best pixel F1 over the data seen by ``metrics``.

    Args:
        metrics: a :class:`~torchdefects.DefectMetrics` updated with maps and ground truth
            (exact mode for an exact threshold; binned mode picks among bucket edges).
        source: the provenance ``source``.
        roi_xyxy_norm: recorded in the provenance (default: the metrics' ROI).

    Returns:
        ``(threshold, provenance)``; ``map >= threshold`` reaches ``provenance["f1"]``.

    Raises:
        ValueError: no positive (ground-truth) pixel was seen.

    Example:
        >>> import torch
        >>> m = DefectMetrics()
        >>> m.update(torch.tensor([[[0.9, 0.4], [0.6, 0.1]]]),
        ...          torch.tensor([[[True, False], [True, False]]]))
        >>> thr, prov = segf1_threshold(m)
        >>> thr, prov["method"], prov["f1"]
        (0.6000000238418579, 'supervised_segf1', 1.0)
    """
    if not isinstance(metrics, DefectMetrics):
        raise TypeError(f"metrics must be a DefectMetrics, got {type(metrics).__name__}")
    c = metrics.curve()
    if c.positives == 0:
        raise ValueError(
            "segf1 needs ground-truth defect pixels: the ground truth has no pixel inside the "
            "evaluated area (ROI, non-NaN)"
        )
    i = _argmax_f1(c.tp, c.fp, c.positives)
    tp, fp = int(c.tp[i]), int(c.fp[i])
    fn = c.positives - tp
    roi = roi_xyxy_norm if roi_xyxy_norm is not None else metrics.roi
    prov = {
        "source": source,
        "method": "supervised_segf1",
        "f1": 2 * tp / (2 * tp + fp + fn),
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / c.positives,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "positive_pixel_count": c.positives,
        "negative_pixel_count": c.negatives,
        "image_count": metrics._images,
        "distinct_thresholds": int(c.thresholds.size),
        "exact": metrics.bins is None,
        "ties": "lowest threshold",
        "rule": "map >= threshold inside the ROI, NaN pixels excluded",
        "roi_xyxy_norm": None if roi is None else [float(v) for v in roi],
    }
    return float(c.thresholds[i]), prov


def _scores(scores: Any, labels: Any) -> Tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(
            f"labels must have the shape of scores {list(s.shape)}, got {list(y.shape)}"
        )
    return s, y.astype(bool)


def image_threshold_f1(
    scores: Any, labels: Any, source: str = "train_dir"
) -> Tuple[float, Dict[str, Any]]:
    """The image threshold with the best image F1 of ``score >= t`` (ties: the lowest).

    Args:
        scores: image scores :math:`(N,)` (NaN scores are never defective).
        labels: :math:`(N,)`, nonzero = defective.
        source: the provenance ``source``.

    Raises:
        ValueError: no defective image, or shapes differ.

    Example:
        >>> image_threshold_f1([0.2, 0.9, 0.5, 0.7], [0, 1, 0, 1])
        (0.7, {'source': 'train_dir', 'method': 'image_f1', 'f1': 1.0, 'tp': 2, 'fp': 0, 'fn': 0, 'image_count': 4, 'defective_image_count': 2, 'ties': 'lowest threshold'})
    """  # noqa: E501
    s, y = _scores(scores, labels)
    thr, f1, _ = best_f1_threshold(s, y)
    if thr is None:
        raise ValueError("image_f1 needs at least one defective image with a score")
    pred = s >= thr
    prov = {
        "source": source,
        "method": "image_f1",
        "f1": f1,
        "tp": int((pred & y).sum()),
        "fp": int((pred & ~y).sum()),
        "fn": int((~pred & y).sum()),
        "image_count": int(s.size),
        "defective_image_count": int(y.sum()),
        "ties": "lowest threshold",
    }
    return thr, prov


def image_threshold_normal_quantile(
    scores: Any, labels: Any = None, q: float = 0.99, source: str = "train_dir"
) -> Tuple[float, Dict[str, Any]]:
    """The ``q``-quantile of the normal images' scores (``numpy.quantile``, linear).

    Args:
        scores: image scores :math:`(N,)`.
        labels: :math:`(N,)`, nonzero = defective (left out); ``None``: all normal.
        q: in [0, 1].
        source: the provenance ``source``.

    Raises:
        ValueError: q out of range, no normal image, or a NaN normal score.

    Example:
        >>> image_threshold_normal_quantile([1.0, 2.0, 3.0, 9.0], [0, 0, 0, 1], q=0.5)[0]
        2.0
    """
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be a number in [0, 1], got {q!r}")
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.zeros(s.shape, bool) if labels is None else _scores(s, labels)[1]
    normal = s[~y]
    if normal.size == 0:
        raise ValueError("normal_quantile needs at least one normal image")
    if np.isnan(normal).any():
        raise ValueError(
            f"normal_quantile: {int(np.isnan(normal).sum())} normal images have a NaN score"
        )
    thr = float(np.quantile(normal, q))
    prov = {
        "source": source,
        "method": "normal_quantile",
        "q": float(q),
        "normal_image_count": int(normal.size),
        "flagged_normal_images": int((normal >= thr).sum()),
    }
    if math.isinf(thr):
        raise ValueError(f"normal_quantile gives an infinite threshold ({thr})")
    return thr, prov
