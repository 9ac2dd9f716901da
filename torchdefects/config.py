"""``DefectsConfig``: the settings of the defect pipeline, validated once."""

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from torchdefects._check import (
    check_bool,
    check_choice,
    check_finite,
    check_int,
    check_ksize,
    check_roi,
)

__all__ = ["DefectsConfig"]


@dataclass
class DefectsConfig:
    """Settings of :class:`~torchdefects.DefectHead`; names follow pyimgano's ``defects`` block.

    Args:
        pixel_threshold: a map pixel ``>=`` this is foreground; ``None`` means it must be
            given per call or resolved from calibration.
        roi_xyxy_norm: region of interest ``[x1, y1, x2, y2]`` in [0, 1] (clamped and
            reordered); ``None`` is the whole map.
        open_ksize: side of the square opening (0 = off, else odd >= 3).
        close_ksize: side of the square closing (0 = off, else odd >= 3).
        fill_holes: fill background not 4-connected to the border.
        min_area: drop components with fewer pixels.
        max_regions: keep at most this many regions per image (``None`` = all).
        connectivity: 4 or 8.

    Raises:
        ValueError, TypeError: a field is out of range; the message names the field.
    """

    pixel_threshold: Optional[float] = None
    roi_xyxy_norm: Optional[List[float]] = None
    open_ksize: int = 0
    close_ksize: int = 0
    fill_holes: bool = False
    min_area: int = 0
    max_regions: Optional[int] = None
    connectivity: int = 8
    _prefix: str = field(default="", repr=False, compare=False)

    def __post_init__(self) -> None:
        self.validate(self._prefix)

    def validate(self, prefix: str = "") -> None:
        """Check every field; ``prefix`` is put before field names in messages."""
        p = prefix
        check_finite(p + "pixel_threshold", self.pixel_threshold, allow_none=True)
        check_roi(p + "roi_xyxy_norm", self.roi_xyxy_norm)
        check_ksize(p + "open_ksize", self.open_ksize)
        check_ksize(p + "close_ksize", self.close_ksize)
        check_bool(p + "fill_holes", self.fill_holes)
        check_int(p + "min_area", self.min_area, minimum=0)
        check_int(p + "max_regions", self.max_regions, minimum=1, allow_none=True)
        check_choice(p + "connectivity", self.connectivity, (4, 8))
        if self.pixel_threshold is not None:
            self.pixel_threshold = float(self.pixel_threshold)
        if self.roi_xyxy_norm is not None:
            self.roi_xyxy_norm = [float(v) for v in self.roi_xyxy_norm]

    def to_dict(self) -> Dict[str, Any]:
        """The fields as a JSON-ready dict (the ``defects`` block of a config file)."""
        d = asdict(self)
        d.pop("_prefix")
        return d
