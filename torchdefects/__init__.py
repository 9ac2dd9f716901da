"""torchdefects: defects (masks and regions) from anomaly maps, batched on the device."""

__version__ = "0.1.0"

from torchdefects.calibration import PixelThresholdCalibrator, resolve_pixel_threshold
from torchdefects.components import connected_components
from torchdefects.config import ConfigError, DefectsConfig, load_config, save_config
from torchdefects.export import (
    attach,
    export_from_config,
    export_onnx,
    export_pt2,
    load_pt2,
    load_scripted,
    save_scripted,
)
from torchdefects.head import DefectHead, Defects, StaticDefectHead, StaticDefects
from torchdefects.morphology import closing, dilation, erosion, fill_holes, opening
from torchdefects.overlay import render_overlay
from torchdefects.regions import Regions, region_stats, select_regions
from torchdefects.roi import roi_mask, roi_stats
from torchdefects.threshold import binarize

__all__ = [
    "ConfigError",
    "DefectHead",
    "Defects",
    "DefectsConfig",
    "PixelThresholdCalibrator",
    "Regions",
    "StaticDefectHead",
    "StaticDefects",
    "__version__",
    "attach",
    "binarize",
    "closing",
    "connected_components",
    "dilation",
    "erosion",
    "export_from_config",
    "export_onnx",
    "export_pt2",
    "fill_holes",
    "load_config",
    "load_pt2",
    "load_scripted",
    "opening",
    "region_stats",
    "render_overlay",
    "resolve_pixel_threshold",
    "roi_mask",
    "roi_stats",
    "save_config",
    "save_scripted",
    "select_regions",
]
