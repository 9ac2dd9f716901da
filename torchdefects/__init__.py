"""torchdefects: defects (masks and regions) from anomaly maps, batched on the device."""

__version__ = "0.1.0"

from torchdefects.batch import RunOptions, RunSummary, calibrate_maps, run_folder
from torchdefects.calibration import PixelThresholdCalibrator, resolve_pixel_threshold
from torchdefects.components import connected_components
from torchdefects.config import ConfigError, DefectsConfig, load_config, save_config
from torchdefects.ellipse import dilate_ellipse, ellipse_kernel
from torchdefects.evaluate import evaluate_dir
from torchdefects.export import (
    attach,
    export_from_config,
    export_onnx,
    export_pt2,
    load_pt2,
    load_scripted,
    save_scripted,
)
from torchdefects.extract import extract_defects
from torchdefects.filters import border_ignore, gaussian_kernel1d, smooth_map
from torchdefects.head import DefectHead, Defects, StaticDefectHead, StaticDefects
from torchdefects.hysteresis import hysteresis_bounds, hysteresis_threshold
from torchdefects.metrics import DefectMetrics
from torchdefects.morphology import closing, dilation, erosion, fill_holes, opening
from torchdefects.normalize import normalize_map, sensitivity_threshold
from torchdefects.overlay import render_overlay
from torchdefects.presets import list_presets, preset_config
from torchdefects.region_filters import (
    MergedRegions,
    finalize_regions,
    merge_nearby,
    merged_from_ids,
    quantile_keep,
    region_keep,
)
from torchdefects.regions import Regions, region_stats, select_regions
from torchdefects.report import write_report
from torchdefects.roi import roi_mask, roi_stats
from torchdefects.severity import (
    RegionUnits,
    SeverityRules,
    parse_severity_rules,
    region_units,
    severity_classes,
    severity_features,
)
from torchdefects.shape import ShapeStats, shape_stats, solidity
from torchdefects.supervised import (
    image_threshold_f1,
    image_threshold_normal_quantile,
    segf1_threshold,
)
from torchdefects.threshold import binarize

__all__ = [
    "ConfigError",
    "DefectHead",
    "DefectMetrics",
    "Defects",
    "DefectsConfig",
    "MergedRegions",
    "PixelThresholdCalibrator",
    "RegionUnits",
    "Regions",
    "RunOptions",
    "RunSummary",
    "SeverityRules",
    "ShapeStats",
    "StaticDefectHead",
    "StaticDefects",
    "__version__",
    "attach",
    "binarize",
    "border_ignore",
    "calibrate_maps",
    "closing",
    "connected_components",
    "dilate_ellipse",
    "dilation",
    "ellipse_kernel",
    "erosion",
    "evaluate_dir",
    "export_from_config",
    "export_onnx",
    "export_pt2",
    "extract_defects",
    "fill_holes",
    "finalize_regions",
    "gaussian_kernel1d",
    "hysteresis_bounds",
    "hysteresis_threshold",
    "image_threshold_f1",
    "image_threshold_normal_quantile",
    "list_presets",
    "load_config",
    "load_pt2",
    "load_scripted",
    "merge_nearby",
    "merged_from_ids",
    "normalize_map",
    "opening",
    "parse_severity_rules",
    "preset_config",
    "quantile_keep",
    "region_keep",
    "region_stats",
    "region_units",
    "render_overlay",
    "resolve_pixel_threshold",
    "roi_mask",
    "roi_stats",
    "run_folder",
    "save_config",
    "save_scripted",
    "segf1_threshold",
    "select_regions",
    "sensitivity_threshold",
    "severity_classes",
    "severity_features",
    "shape_stats",
    "smooth_map",
    "solidity",
    "write_report",
]
