"""Pixel-threshold calibration on normal maps: an exact streaming quantile with provenance.

The threshold is ``numpy.quantile(all_roi_pixels, q)`` (linear method, float64) over every
ROI pixel of every map seen, computed without holding all pixels: only the order statistics
that the quantile can still need are kept, on the maps' device. See ``docs/calibration.md``.
"""

import datetime
import hashlib
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from torchdefects._check import _as_bhw, _check_float_map, check_finite, check_roi
from torchdefects.roi import roi_bounds, roi_tensor

__all__ = [
    "CalibrationNotExactError",
    "PixelThresholdCalibrator",
    "resolve_pixel_threshold",
]

PIXEL_THRESHOLD_REQUIRED = (
    "requires a pixel threshold. Provide --pixel-threshold, set defects.pixel_threshold in the "
    "config, or calibrate on normal maps (torchdefects calibrate)"
)

# Below this many kept values a prune is not worth its cost.
_MIN_PRUNE = 1 << 20


class CalibrationNotExactError(RuntimeError):
    """The single pass could not keep every order statistic the quantile needs.

    Raised by :meth:`PixelThresholdCalibrator.compute` when the high (or low) values of the
    stream came late and outnumbered the margin kept; call
    :meth:`~PixelThresholdCalibrator.begin_second_pass` and feed the same maps again.
    """


def _roi_slices(roi: Optional[Sequence[float]], h: int, w: int) -> Tuple[int, int, int, int]:
    """Rows ``r0:r1`` and columns ``c0:c1`` inside the ROI, from :func:`roi.roi_bounds`."""
    if roi is None:
        return 0, h, 0, w
    c0, c1, r0, r1 = (int(v) for v in roi_bounds(roi_tensor(roi), h, w))
    return r0, r1, c0, c1


def _normalize_roi(roi: Optional[Sequence[float]]) -> Optional[List[float]]:
    if roi is None:
        return None
    x1, y1, x2, y2 = (min(max(float(v), 0.0), 1.0) for v in roi)
    return [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]


#: Extra quantiles of the normal pixels recorded in the provenance when they are exact.
NORMAL_QUANTILES = (0.99, 0.999, 0.9999)


def _q_key(q: float) -> str:
    return repr(float(q))


def _finite(v: float) -> Optional[float]:
    return v if math.isfinite(v) else None


def _quantile_indices(n: int, q: float) -> Tuple[int, ...]:
    """The sorted positions ``numpy.quantile`` (linear) reads for ``n`` values at ``q``."""
    vi = np.float64(n - 1) * np.float64(q)
    if vi >= n - 1:
        return (n - 1,)
    lo = math.floor(vi)
    return (lo, lo + 1)


def _numpy_linear_quantile(n: int, q: float, value_at: Any) -> float:
    """``numpy.quantile(x, q)`` for sorted ``x`` of length ``n``, from ``value_at(i) = x[i]``.

    Mirrors NumPy's ``linear`` method step by step (virtual index, neighbours, gamma and its
    two-sided lerp) in float64 so the result is bit-identical, infinities included.
    """
    vi = np.float64(n - 1) * np.float64(q)
    if vi >= n - 1:
        prev_i, next_i, prev_for_gamma = n - 1, n - 1, -1
    else:
        prev_i = math.floor(vi)
        next_i, prev_for_gamma = prev_i + 1, prev_i
    gamma = vi - np.float64(prev_for_gamma)
    a = np.float64(value_at(prev_i))
    b = np.float64(value_at(next_i))
    with np.errstate(invalid="ignore", over="ignore"):
        diff = b - a
        if gamma >= 0.5:
            return float(b - diff * (np.float64(1) - gamma))
        return float(a + diff * gamma)


class PixelThresholdCalibrator:
    """Exact streaming ``q``-quantile of the ROI pixels of normal anomaly maps.

    ``compute()`` equals ``numpy.quantile(np.float64(all_roi_pixels), q)`` (linear method)
    for any ``q`` in [0, 1], ties included, as if every ROI pixel of every map passed to
    :meth:`update` had been kept.

    What it keeps: on the maps' device, the values on one side of the quantile that it may
    still need: the largest ones when ``q >= 0.5``, the smallest otherwise. For ``N`` pixels
    so far that is ``need(N) = N - floor(q (N - 1))`` values (``floor(q (N - 1)) + 2`` on the
    low side), about ``(1 - q) N``: the memory exactness needs. It keeps a margin of 50 % plus
    4096 values above that, and values strictly beyond a cut value ``c`` only (plus a count
    of values equal to ``c`` that were dropped); it prunes by selection
    (``torch.kthvalue``) when the kept values pass twice the target, or ``2^20``. Peak
    memory is therefore about ``3 need(N)`` to ``6 need(N)`` values plus one batch: 2^27
    pixels at ``q = 0.999`` keep under a million floats; ``q = 0.5`` keeps up to all of them.

    Exactness: every dropped value is ``<= c``; so the ``k`` values kept are exactly the
    ``k`` largest of the whole stream and the next ``ties(c)`` ranks all equal ``c``. The
    quantile needs the values at two adjacent ranks; :meth:`compute` checks that they fall
    in that known range and raises :class:`CalibrationNotExactError` otherwise (possible
    only when high values arrive late and in excess of the margin, since ``need`` grows with
    ``N``). :meth:`begin_second_pass` then fixes ``N`` from the first pass; a second pass
    over the same maps keeps exactly ``need(N)`` values and is always exact; its
    fingerprint must equal the first pass's. The CLI does this on its own.

    Args:
        q: quantile in [0, 1].
        roi_xyxy_norm: ROI ``[x1, y1, x2, y2]`` in [0, 1] (clamped, reordered); columns
            ``floor(x1 W) .. ceil(x2 W) - 1`` and rows likewise are inside. ``None``: all.
        nan_policy: ``"raise"``: :meth:`update` raises on NaN in the ROI, naming how many;
            ``"omit"``: NaN pixels are skipped and counted in the provenance.

    Example:
        >>> cal = PixelThresholdCalibrator(q=0.5)
        >>> cal.update(torch.arange(10.0).reshape(1, 1, 2, 5))
        >>> cal.compute()[0]
        4.5
    """

    def __init__(
        self,
        q: float = 0.999,
        roi_xyxy_norm: Optional[Sequence[float]] = None,
        nan_policy: str = "raise",
    ) -> None:
        check_finite("q", q)
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q must be in [0, 1], got {q}")
        check_roi("roi_xyxy_norm", roi_xyxy_norm)
        if nan_policy not in ("raise", "omit"):
            raise ValueError(f"nan_policy must be one of 'raise', 'omit', got {nan_policy!r}")
        self.q = float(q)
        self.roi_xyxy_norm = _normalize_roi(roi_xyxy_norm)
        self.nan_policy = nan_policy
        self._high = self.q >= 0.5
        self.reset()

    # ------------------------------------------------------------------ state

    def reset(self) -> None:
        """Forget everything seen, including a second pass in progress."""
        self._start_pass(fixed_count=None)
        self._first_pass: Optional[Tuple[int, int, int, str]] = None

    def _start_pass(self, fixed_count: Optional[int]) -> None:
        self._fixed_count = fixed_count
        self._chunks: List[Tensor] = []
        self._kept = 0
        self._cut: Optional[Tensor] = None  # 0-d tensor, keys <= cut were dropped
        self._cut_ties = 0
        self._n = 0  # ROI pixels in the quantile
        self._maps = 0
        self._pixels = 0
        self._nan = 0
        self._min: Optional[Tensor] = None  # running min / max of the normal ROI pixels
        self._max: Optional[Tensor] = None
        self._roi_sizes: set = set()  # ROI pixels per map (one value when maps share a size)
        self._sha = hashlib.sha256()
        self._device: Optional[torch.device] = None
        self._dtype = torch.float32

    def begin_second_pass(self) -> None:
        """Start an always-exact second pass; feed the same maps in the same order again."""
        if self._n == 0:
            raise RuntimeError("begin_second_pass() needs a first pass: call update() first")
        self._first_pass = (self._n, self._maps, self._pixels, self._fingerprint())
        self._start_pass(fixed_count=self._n)

    # ------------------------------------------------------------------ helpers

    def _need(self, n: int) -> int:
        lo = math.floor((n - 1) * self.q)
        need = n - lo if self._high else lo + 2
        return min(max(need, 1), n)

    def count_nan(self, maps: Union[Tensor, np.ndarray]) -> int:
        """Number of NaN pixels inside the ROI of ``maps`` ((H, W), (B, H, W) or (B, 1, H, W))."""
        if isinstance(maps, np.ndarray):
            maps = torch.from_numpy(maps if maps.flags.writeable else maps.copy())
        x = torch.as_tensor(maps)
        if x.dim() == 2:
            x = x.unsqueeze(0)
        x = _as_bhw(x, "maps")
        r0, r1, c0, c1 = _roi_slices(self.roi_xyxy_norm, x.shape[-2], x.shape[-1])
        return int(torch.isnan(x[:, r0:r1, c0:c1]).sum())

    def _fingerprint(self) -> str:
        return "sha256:" + self._sha.copy().hexdigest()

    # ------------------------------------------------------------------ update

    @torch.no_grad()
    def update(self, maps: Tensor) -> None:
        """Add a batch of normal maps.

        Args:
            maps: :math:`(B, 1, H, W)` or :math:`(B, H, W)` float tensor on any device; the
                kept values live on the device of the first batch.

        Raises:
            ValueError: NaN pixels in the ROI with ``nan_policy="raise"`` (the message gives
                how many; the batch is then not counted), or a bad shape.
        """
        if not isinstance(maps, Tensor):
            raise TypeError(f"maps must be a torch.Tensor, got {type(maps).__name__}")
        x = _as_bhw(maps, "maps")
        _check_float_map(x, "maps")
        if x.dtype != torch.float64:
            x = x.to(torch.float32)
        if self._device is None:
            self._device = x.device
        elif x.device != self._device:
            x = x.to(self._device)
        if x.dtype == torch.float64 and self._dtype != torch.float64:
            self._dtype = torch.float64
            self._chunks = [c.to(torch.float64) for c in self._chunks]
            if self._cut is not None:
                self._cut = self._cut.to(torch.float64)
        b, h, w = x.shape
        r0, r1, c0, c1 = _roi_slices(self.roi_xyxy_norm, h, w)
        roi = x[:, r0:r1, c0:c1]
        n_nan = 0
        # A float sum is much cheaper than counting; it is NaN whenever a NaN is present.
        if roi.numel() and bool(torch.isnan(roi.sum())):
            n_nan = int(torch.count_nonzero(torch.isnan(roi)))
        if n_nan and self.nan_policy == "raise":
            raise ValueError(
                f"maps contain {n_nan} NaN pixels inside the ROI in this batch of {b}; "
                "clean the maps or use nan_policy='omit'"
            )

        if b:
            # Hash what the caller passed (whole maps), per map, so batching does not matter.
            host = x.detach().to("cpu").contiguous().numpy()
            tag = "f8" if host.dtype == np.float64 else "f4"
            for i in range(b):
                self._sha.update(f"{tag}:{h}x{w};".encode())
                self._sha.update(np.ascontiguousarray(host[i], dtype="<" + tag).data)
        self._maps += b
        self._pixels += b * h * w
        self._nan += n_nan
        if b:
            self._roi_sizes.add((r1 - r0) * (c1 - c0))

        vals = roi.reshape(-1) if roi.is_contiguous() else roi.flatten()
        if n_nan:
            vals = vals[~torch.isnan(vals)]
        if vals.numel():
            lo, hi = torch.aminmax(vals)  # no host sync: kept as 0-d tensors
            lo, hi = lo.to(torch.float64), hi.to(torch.float64)
            self._min = lo if self._min is None else torch.minimum(self._min, lo)
            self._max = hi if self._max is None else torch.maximum(self._max, hi)
        key = vals.to(self._dtype) if self._high else -vals.to(self._dtype)
        self._n += key.numel()
        if self._cut is not None:
            key = key[key >= self._cut]  # one pass over the batch; the rest is small
            at_cut = key == self._cut
            self._cut_ties += int(torch.count_nonzero(at_cut))
            key = key[~at_cut]
        elif key.untyped_storage().data_ptr() == maps.untyped_storage().data_ptr():
            key = key.clone()  # never hold on to (or alias) the caller's tensor
        if key.numel():
            self._chunks.append(key)
            self._kept += key.numel()
        target = self._target()
        if self._kept > max(2 * target, _MIN_PRUNE):
            self._prune(target)

    def _target(self) -> int:
        if self._fixed_count is not None:
            return self._need(self._fixed_count)
        need = self._need(self._n)
        return need + need // 2 + 4096

    def _prune(self, keep: int) -> None:
        """Keep the values strictly above the (keep+1)-th largest; that value becomes the cut."""
        allk = torch.cat(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        if allk.numel() <= keep:
            return
        # (keep+1)-th largest == (n-keep)-th smallest
        cut = torch.kthvalue(allk, allk.numel() - keep).values
        self._cut_ties = int(torch.count_nonzero(allk == cut))
        kept = allk[allk > cut]
        self._cut = cut
        self._chunks = [kept] if kept.numel() else []
        self._kept = kept.numel()

    @property
    def kept_count(self) -> int:
        """How many values are held now (the memory used, in values of the maps' dtype)."""
        return self._kept

    # ------------------------------------------------------------------ compute

    def is_exact(self) -> bool:
        """Whether :meth:`compute` can answer exactly from what is kept."""
        if self._n == 0:
            return False
        need = self._need(self._n)
        return self._cut is None or need <= self._kept + self._cut_ties

    def compute(self) -> Tuple[float, Dict[str, Any]]:
        """The threshold and its provenance.

        Returns:
            ``(threshold, provenance)``: ``threshold`` a Python float; ``provenance`` a
            JSON-ready dict (see ``docs/calibration.md``).

        Raises:
            ValueError: no ROI pixel was seen.
            CalibrationNotExactError: a second pass is needed (see the class docstring).
            RuntimeError: a second pass saw other data than the first.
        """
        if self._n == 0:
            raise ValueError(
                "no ROI pixels seen: call update() with normal maps first"
                + (" (the ROI is empty for these maps)" if self._pixels else "")
            )
        if self._first_pass is not None:
            seen = (self._n, self._maps, self._pixels, self._fingerprint())
            if seen != self._first_pass:
                first = self._first_pass
                raise RuntimeError(
                    "the second pass saw different data than the first: "
                    f"{self._maps} maps, {self._n} pixels, {seen[3]} in the second; "
                    f"{first[1]} maps, {first[0]} pixels, {first[3]} in the first"
                )
        if not self.is_exact():
            raise CalibrationNotExactError(
                f"the last {self._n} pixels moved the q={self.q} quantile below the values "
                "kept; call begin_second_pass() and update() with the same maps again"
            )
        n = self._n
        kept = torch.cat(self._chunks) if self._chunks else torch.empty(0, dtype=self._dtype)
        kept = torch.sort(kept, descending=True).values.cpu()
        n_kept = kept.numel()
        cut = None if self._cut is None else float(self._cut)
        # Ranks (among keys, largest first) known exactly: the kept ones and the cut's ties.
        known = n_kept + (self._cut_ties if cut is not None else 0)

        def rank(i: int) -> int:
            return n - 1 - i if self._high else i

        def value_at(i: int) -> float:
            r = rank(i)
            v = float(kept[r]) if r < n_kept else cut
            assert v is not None
            return v if self._high else -v

        threshold = _numpy_linear_quantile(n, self.q, value_at)
        extra: Dict[str, Optional[float]] = {}
        for q in NORMAL_QUANTILES:
            exact = all(rank(i) < known for i in _quantile_indices(n, q))
            extra[_q_key(q)] = _finite(_numpy_linear_quantile(n, q, value_at)) if exact else None
        return threshold, self._provenance(extra)

    def _provenance(self, quantiles: Dict[str, Optional[float]]) -> Dict[str, Any]:
        from torchdefects import __version__

        roi_used = self.roi_xyxy_norm is not None
        per_map = None
        if roi_used and len(self._roi_sizes) == 1:
            per_map = next(iter(self._roi_sizes))
        prov: Dict[str, Any] = {
            "source": "train_dir",
            "method": "normal_pixel_quantile",
            "q": self.q,
            "calibration_map_count": self._maps,
            "calibration_pixel_count": self._n,
            "roi_used": roi_used,
            "roi_reason": None,
            "roi_xyxy_norm": None if self.roi_xyxy_norm is None else list(self.roi_xyxy_norm),
            "roi_pixel_count": per_map,
            "map_pixel_count": self._pixels,
            "exactness": "exact",
            "passes": 1 if self._first_pass is None else 2,
            "normal_min": None if self._min is None else _finite(float(self._min)),
            "normal_max": None if self._max is None else _finite(float(self._max)),
            "normal_quantiles": quantiles,
            "fingerprint": self._fingerprint(),
            "torchdefects_version": __version__,
            "created_at": datetime.datetime.now(datetime.timezone.utc)
            .replace(microsecond=0)
            .isoformat()
            .replace("+00:00", "Z"),
        }
        if self.nan_policy == "omit":
            prov["nan_policy"] = "omit"
            prov["nan_pixel_count"] = self._nan
        return prov


def resolve_pixel_threshold(
    explicit: Optional[float] = None,
    config: Any = None,
    config_path: Optional[str] = None,
    calibration: Any = None,
    strategy: Optional[str] = None,
) -> Tuple[float, Dict[str, Any]]:
    """The pixel threshold and its provenance, from the first source that has one.

    Order (pyimgano's): ``explicit`` value -> ``config`` (a
    :class:`~torchdefects.config.DefectsConfig`, a config dict, or a path; ``config_path``
    names the file in the provenance) -> ``calibration`` (a :class:`PixelThresholdCalibrator`
    with data, or a ``(threshold, provenance)`` pair) -> error.

    Provenance, in pyimgano's vocabulary (``docs/calibration.md``):
    ``{"source": "explicit", "method": "fixed", "value": t}``;
    ``{"source": "infer_config", "method": "fixed", "value": t, "path": ...}`` with the
    record stored in the config, if any, nested as ``"stored_provenance"``; a calibration's
    own record (``"source": "train_dir"``) passed through. A ``(threshold, provenance)``
    pair in the older vocabulary is converted (:func:`~torchdefects.config.upgrade_provenance`).

    Args:
        strategy: pyimgano's ``pixel_threshold_strategy`` when neither ``explicit`` nor the
            config has a threshold: ``"fixed"`` and ``"infer_config"`` then raise (they need
            one), ``"normal_pixel_quantile"`` (or ``None``) uses ``calibration``.

    Raises:
        ValueError: no source has a threshold; the message gives the three ways to give one.

    Example:
        >>> resolve_pixel_threshold(0.5)
        (0.5, {'source': 'explicit', 'method': 'fixed', 'value': 0.5})
    """
    from torchdefects.config import upgrade_provenance

    if strategy is not None and strategy not in ("fixed", "infer_config", "normal_pixel_quantile"):
        raise ValueError(
            "strategy must be one of 'fixed', 'infer_config', 'normal_pixel_quantile' or None, "
            f"got {strategy!r}"
        )
    if explicit is not None:
        check_finite("pixel_threshold", explicit)
        t = float(explicit)
        return t, {"source": "explicit", "method": "fixed", "value": t}
    if config is None and config_path is not None:
        config = config_path
    if config is not None:
        from torchdefects.config import DefectsConfig, load_config

        if isinstance(config, str) and config_path is None:
            config_path = config
        cfg = config if isinstance(config, DefectsConfig) else load_config(config)
        if cfg.pixel_threshold is not None:
            t = float(cfg.pixel_threshold)
            prov: Dict[str, Any] = {
                "source": "infer_config",
                "method": "fixed",
                "value": t,
                "path": config_path,
            }
            if cfg.pixel_threshold_provenance is not None:
                prov["stored_provenance"] = upgrade_provenance(cfg.pixel_threshold_provenance)
            return t, prov
    if strategy == "infer_config":
        raise ValueError(
            "pixel_threshold_strategy=infer_config requires defects.pixel_threshold in the config"
        )
    if strategy == "fixed":
        raise ValueError(
            "pixel_threshold_strategy=fixed requires a fixed threshold: provide "
            "--pixel-threshold or defects.pixel_threshold in the config"
        )
    if calibration is not None:
        if isinstance(calibration, PixelThresholdCalibrator):
            return calibration.compute()
        threshold, prov = calibration
        check_finite("pixel_threshold", threshold)
        upgraded = upgrade_provenance(dict(prov))
        assert upgraded is not None
        return float(threshold), upgraded
    raise ValueError("torchdefects " + PIXEL_THRESHOLD_REQUIRED)
