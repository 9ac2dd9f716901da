"""The one library calibration path: ``calibrate_maps`` over files or arrays.

Used by ``torchdefects calibrate``, by ``torchdefects run --pixel-threshold-strategy
normal_pixel_quantile --train-dir DIR`` (inline) and by the demo. It streams the maps in
batches of one shape through :class:`~torchdefects.calibration.PixelThresholdCalibrator`
and, when the single pass cannot be exact, makes the always-exact second pass itself.
"""

from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch

from torchdefects.calibration import PixelThresholdCalibrator

__all__ = ["CalibrationFailed", "CalibrationResult", "calibrate_maps"]

MapSource = Union[str, np.ndarray, torch.Tensor]


class CalibrationFailed(RuntimeError):
    """No map could be used, or a map changed between the two passes."""


class CalibrationResult(NamedTuple):
    """``threshold`` and its ``provenance``; ``used`` maps; ``failed`` lines
    (``"path: why"``) of maps left out; ``passes`` 1 or 2."""

    threshold: float
    provenance: Dict[str, Any]
    used: int
    failed: List[str]
    passes: int


def _default_load(item: MapSource) -> np.ndarray:
    if isinstance(item, str):
        from torchdefects.files import read_map

        return read_map(item)
    if isinstance(item, torch.Tensor):
        return item.detach().cpu().numpy()
    return np.asarray(item)


def _name(item: MapSource, i: int) -> str:
    return item if isinstance(item, str) else f"map {i}"


def calibrate_maps(
    maps: Sequence[MapSource],
    *,
    q: Optional[float] = None,
    roi_xyxy_norm: Optional[Sequence[float]] = None,
    nan_policy: str = "raise",
    device: Union[str, torch.device] = "cpu",
    batch_size: int = 32,
    load: Optional[Callable[[MapSource], np.ndarray]] = None,
    progress: Optional[Callable[[str, int, int], None]] = None,
) -> CalibrationResult:
    """Exact ``q``-quantile of the ROI pixels of normal maps, with its provenance.

    Args:
        maps: paths (read with :func:`torchdefects.files.read_map`) or :math:`(H, W)`
            arrays/tensors, or anything ``load`` turns into an :math:`(H, W)` float array.
        q: quantile in [0, 1] (``None``: the calibrator's default, 0.999).
        roi_xyxy_norm: ROI ``[x1, y1, x2, y2]`` in [0, 1], or ``None`` for the whole map.
        nan_policy: ``"raise"`` leaves maps with NaN in the ROI out (listed in ``failed``);
            ``"omit"`` skips those pixels.
        device: where the kept values live.
        batch_size: maps per update (maps of one shape are stacked).
        load: ``item -> (H, W) array``; the default reads paths and passes arrays.
        progress: ``f(pass_label, done, total)``, called after each map.

    Returns:
        :class:`CalibrationResult`.

    Raises:
        ValueError: bad ``q``, ``roi_xyxy_norm``, ``nan_policy`` or ``batch_size``.
        CalibrationFailed: no map could be used, or one changed between passes.

    Example:
        >>> maps = [np.arange(10, dtype=np.float32).reshape(2, 5)]
        >>> calibrate_maps(maps, q=0.5).threshold
        4.5
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    kwargs = {} if q is None else {"q": q}
    cal = PixelThresholdCalibrator(roi_xyxy_norm=roi_xyxy_norm, nan_policy=nan_policy, **kwargs)
    read = load or _default_load
    dev = torch.device(device)
    failed: List[str] = []
    used: List[int] = []

    def one_pass(positions: Sequence[int], first: bool, label: str) -> None:
        batch: List[np.ndarray] = []
        for k, i in enumerate(positions):
            name = _name(maps[i], i)
            try:
                m = np.asarray(read(maps[i]), dtype=np.float32)
                if m.ndim != 2 or m.size == 0:
                    raise ValueError(f"{name}: map must have shape (H, W), got {list(m.shape)}")
                if nan_policy == "raise":
                    n_nan = cal.count_nan(m)
                    if n_nan:
                        raise ValueError(f"{name}: {n_nan} NaN pixels in the ROI")
            except (OSError, ValueError) as e:
                if not first:
                    raise CalibrationFailed(f"{name} changed between passes: {e}") from e
                failed.append(str(e) if str(e).startswith(name) else f"{name}: {e}")
                if progress is not None:
                    progress(label, k + 1, len(positions))
                continue
            if first:
                used.append(i)
            if batch and (batch[0].shape != m.shape or len(batch) >= batch_size):
                cal.update(torch.from_numpy(np.stack(batch)).to(dev))
                batch = []
            batch.append(m)
            if progress is not None:
                progress(label, k + 1, len(positions))
        if batch:
            cal.update(torch.from_numpy(np.stack(batch)).to(dev))

    one_pass(range(len(maps)), True, "calibrate")
    if not used:
        listed = "\n  ".join(failed)
        raise CalibrationFailed(f"none of the {len(maps)} maps could be used:\n  {listed}")
    passes = 1
    if not cal.is_exact():
        # The stream's high values shifted late; a second pass with the count known is exact.
        cal.begin_second_pass()
        one_pass(used, False, "calibrate (pass 2)")
        passes = 2
    threshold, provenance = cal.compute()
    return CalibrationResult(float(threshold), provenance, len(used), failed, passes)
