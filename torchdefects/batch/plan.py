"""What a run will do, resolved before it writes anything: the plan.

:func:`make_plan` checks the options, loads the config and applies the flags that override
it, lists the inputs (the run's own output folders excluded), resolves the pixel
threshold by ``--pixel-threshold-strategy`` (calibrating inline on ``--train-dir`` through
:func:`~torchdefects.batch.calibrate_maps`), and loads the detector. :func:`settings` is
what the results depend on: the manifest records it and ``--resume`` compares it.
"""

import dataclasses
import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from torchdefects._check import check_device
from torchdefects.batch import dist, journal
from torchdefects.batch.calibrate import CalibrationFailed, calibrate_maps
from torchdefects.batch.compute import maps_of
from torchdefects.batch.data import InputDataset, list_run_inputs, output_names
from torchdefects.batch.options import RunOptions, RunUsageError
from torchdefects.config import DefectsConfig
from torchdefects.export import EXTRA_FILES, PREPROCESS_EXTRA_FILE
from torchdefects.geometry import Preprocess

__all__ = ["PREPROCESS_EXTRA_FILE", "Plan", "make_plan", "settings", "versions"]


@dataclasses.dataclass
class Plan:
    """Everything resolved before the first file is written."""

    kind: str
    paths: List[str]
    names: List[str]
    cfg: DefectsConfig
    defects: bool
    threshold: Optional[float]
    provenance: Optional[Dict[str, Any]]
    mask_format: Optional[str]
    mask_dir: Optional[str]
    overlay_dir: Optional[str]
    device: torch.device
    detector: Any
    prep: Optional[Preprocess]
    map_output: Any = None  # --map-output, or the one baked into an exported detector + head


def _check_options(opts: RunOptions) -> None:
    if opts.batch_size < 1:
        raise RunUsageError(f"--batch-size must be >= 1, got {opts.batch_size}")
    if opts.num_workers < 0:
        raise RunUsageError(f"--num-workers must be >= 0, got {opts.num_workers}")
    if isinstance(opts.max_pixels, bool) or not isinstance(opts.max_pixels, int):
        raise RunUsageError(f"--max-pixels must be an integer, got {opts.max_pixels!r}")
    if opts.max_pixels < 1:
        raise RunUsageError(f"--max-pixels must be >= 1, got {opts.max_pixels}")
    if opts.mask_space not in ("anomaly_map", "image"):
        raise RunUsageError(f"--mask-space must be anomaly_map or image, got {opts.mask_space!r}")
    if opts.mask_space == "image" and opts.images is None and opts.image_size is None:
        raise RunUsageError("--mask-space image needs --images or --image-size H W")
    if opts.image_size is not None and opts.images is not None:
        raise RunUsageError("--image-size goes with --maps; with --images the size is read")
    for name in ("image_size", "input_size"):
        v = getattr(opts, name)
        if v is not None and (len(v) != 2 or min(v) < 1):
            flag = "--" + name.replace("_", "-")
            raise RunUsageError(f"{flag} must be two integers H W >= 1, got {list(v)}")
    if opts.resume and opts.overwrite:
        raise RunUsageError("--resume and --overwrite exclude each other")
    if opts.mask_format is not None and opts.save_masks is None:
        raise RunUsageError("--mask-format needs --save-masks")
    if (opts.maps is None) == (opts.images is None):
        raise RunUsageError("give exactly one of --maps or --images")
    if opts.images is not None and opts.detector is None:
        raise RunUsageError("--images needs --detector MODEL.pt")
    if opts.maps is not None and opts.detector is not None:
        raise RunUsageError("--detector goes with --images, not --maps")


def _output_dirs(
    opts: RunOptions, cfg: DefectsConfig
) -> Tuple[Optional[str], Optional[str], Optional[str]]:
    """(mask format, mask folder, overlay folder)."""
    fmt = opts.mask_format or cfg.mask_format or "png"
    mask_dir = None
    if opts.save_masks is not None:
        if opts.save_masks in ("png", "npy", "npz"):
            fmt = opts.save_masks
            mask_dir = os.path.join(opts.out, "masks")
        elif opts.save_masks == "config":
            mask_dir = os.path.join(opts.out, "masks")
        elif opts.save_masks == "":
            raise RunUsageError("--save-masks: give a format (png, npy, npz) or a folder")
        else:
            mask_dir = opts.save_masks
    overlay_dir = None
    if opts.save_overlays is True or opts.save_overlays == "":
        overlay_dir = os.path.join(opts.out, "overlays")
    elif isinstance(opts.save_overlays, str):
        overlay_dir = opts.save_overlays
    return (fmt if mask_dir is not None else None), mask_dir, overlay_dir


def _load_config(opts: RunOptions) -> DefectsConfig:
    from torchdefects.config import ConfigError, load_config

    if opts.config is None:
        if opts.category is not None:
            raise RunUsageError("--category needs --config")
        cfg = DefectsConfig()
    else:
        try:
            cfg = load_config(opts.config, opts.category)
        except (ConfigError, ValueError, TypeError, OSError) as e:
            raise RunUsageError(f"--config {opts.config}: {e}") from e
    overrides = dict(opts.overrides)
    if opts.defects_mask_space is not None:  # pyimgano's flag name for the field mask_space
        overrides["mask_space"] = opts.defects_mask_space
    try:
        return dataclasses.replace(cfg, **overrides)
    except (TypeError, ValueError) as e:
        raise RunUsageError(str(e)) from e


def _threshold(
    opts: RunOptions, cfg: DefectsConfig, plan_device: torch.device, detector: Any, prep: Any
) -> Tuple[float, Dict[str, Any]]:
    """The pixel threshold and its provenance, by ``--pixel-threshold-strategy``."""
    from torchdefects.calibration import resolve_pixel_threshold

    # The flag is strict; the config's strategy (pyimgano's, default normal_pixel_quantile)
    # says where a threshold comes from when none is given, so it only matters with a
    # --train-dir to calibrate on; otherwise the usual resolution (and its error) applies.
    strategy = opts.pixel_threshold_strategy
    if strategy is None and opts.train_dir is not None:
        strategy = cfg.pixel_threshold_strategy
    if strategy == "normal_pixel_quantile":
        if opts.train_dir is None:
            raise RunUsageError(
                "--pixel-threshold-strategy normal_pixel_quantile needs --train-dir"
            )
        if opts.pixel_threshold is not None:
            raise RunUsageError("--pixel-threshold and normal_pixel_quantile exclude each other")
        return _calibrate_inline(opts, cfg, plan_device, detector, prep)
    if opts.train_dir is not None:
        raise RunUsageError(f"--train-dir goes with normal_pixel_quantile, not {strategy}")
    if strategy == "fixed" and opts.pixel_threshold is None:
        raise RunUsageError("--pixel-threshold-strategy fixed needs --pixel-threshold T")
    explicit = opts.pixel_threshold
    if strategy == "infer_config":
        if explicit is not None:
            raise RunUsageError("--pixel-threshold and infer_config exclude each other")
        if cfg.pixel_threshold is None:
            raise RunUsageError("--pixel-threshold-strategy infer_config: the config has none")
    try:
        t, prov = resolve_pixel_threshold(explicit, cfg, opts.config)
    except ValueError as e:
        raise RunUsageError(str(e)) from e
    return float(t), prov


def _calibrate_inline(
    opts: RunOptions, cfg: DefectsConfig, device: torch.device, detector: Any, prep: Any
) -> Tuple[float, Dict[str, Any]]:
    assert opts.train_dir is not None
    kind = "images" if detector is not None else "maps"
    paths, _ = list_run_inputs(opts.train_dir, kind, [opts.out], flag="--train-dir")
    q = opts.pixel_normal_quantile
    if q is None:
        q = getattr(cfg, "pixel_normal_quantile", None)
    load = None
    if detector is not None:
        load = image_map_loader(paths, detector, prep, opts.map_output, device)  # no embedded
    try:
        res = calibrate_maps(
            paths, q=q, roi_xyxy_norm=cfg.roi_xyxy_norm, device=device, load=load,
            batch_size=opts.batch_size,
        )  # fmt: skip
    except (ValueError, CalibrationFailed) as e:
        raise RunUsageError(f"--train-dir {opts.train_dir}: {e}") from e
    if res.failed:
        raise RunUsageError(
            f"--train-dir {opts.train_dir}: {len(res.failed)} normal inputs unusable: "
            + "; ".join(res.failed[:5])
        )
    prov = dict(res.provenance, source="train_dir", train_dir=opts.train_dir)
    return res.threshold, prov


def image_map_loader(
    paths: Sequence[str], detector: Any, prep: Any, map_output: Any, device: torch.device
) -> Callable[[Any], np.ndarray]:
    """``path -> (H, W)`` anomaly map of that image through the detector (for calibration)."""
    ds = InputDataset(list(paths), range(len(paths)), "images", prep, False)
    position = {p: i for i, p in enumerate(paths)}

    def load(path: Any) -> np.ndarray:
        item = ds[position[path]]
        if item.error is not None:
            raise ValueError(item.error[1])
        with torch.inference_mode():
            m = maps_of(detector(item.tensor[None].to(device)), map_output, 1)
        return m[0, 0].float().cpu().numpy()

    return load


#: The flags (argparse dests) that describe a detector and its preprocessing.
DETECTOR_FLAGS = ("detector", "map_output", "input_size", "mean", "std", "center_crop")


def add_detector_arguments(group: Any) -> None:
    """The :data:`DETECTOR_FLAGS` of ``calibrate`` and ``evaluate`` (``--images`` scored by a
    detector, as ``run`` does), read back by :func:`images_through_detector`."""
    group.add_argument("--detector", metavar="MODEL", help="TorchScript or ONNX detector")
    group.add_argument("--map-output", metavar="INDEX_OR_KEY", help="the map among its outputs")
    group.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"), help="as for run")
    group.add_argument("--mean", nargs="+", type=float, help="as for run")
    group.add_argument("--std", nargs="+", type=float, help="as for run")
    group.add_argument("--center-crop", action="store_true", default=None, help="as for run")


def images_through_detector(
    args: Any, paths: Optional[Sequence[str]], device: torch.device
) -> Optional[Callable[[Any], np.ndarray]]:
    """``path -> map`` for the images of ``--images`` scored by ``--detector``, built from the
    same flags as ``run`` (``calibrate`` and ``evaluate`` take them too); ``None`` when
    ``paths`` is ``None`` (``--maps``), where any detector flag is a usage error.

    Raises:
        RunUsageError: a detector flag without ``--images``, ``--images`` without
            ``--detector``, or a detector that cannot be loaded.
    """
    if paths is None:
        used = [f for f in DETECTOR_FLAGS if getattr(args, f, None) is not None]
        if used:
            raise RunUsageError(f"--{used[0].replace('_', '-')} goes with --images")
        return None
    if getattr(args, "detector", None) is None:
        raise RunUsageError("--images needs --detector MODEL to turn images into maps")
    detector, meta = load_detector(args.detector, device)
    prep = preprocess_from(
        meta,
        getattr(args, "input_size", None),
        getattr(args, "mean", None),
        getattr(args, "std", None),
        getattr(args, "center_crop", None),
    )
    key = getattr(args, "map_output", None)
    if isinstance(key, str) and key.lstrip("-").isdigit():
        key = int(key)  # a tuple index, as run's --map-output parses it
    return image_map_loader(paths, detector, prep, key, device)


def load_detector(path: str, device: torch.device) -> Tuple[Any, Dict[str, Any]]:
    """A detector file and its preprocessing metadata: TorchScript, or ONNX (``.onnx``,
    run by onnxruntime from the ``onnx`` extra; its outputs come back by name)."""
    if path.lower().endswith(".onnx"):
        from torchdefects.onnx_detector import OnnxDetector

        try:
            return OnnxDetector(path, device=device), {}
        except (ImportError, OSError, ValueError) as e:
            raise RunUsageError(f"--detector {path}: {e}") from e
        except Exception as e:  # onnxruntime's own errors: a file it cannot load
            raise RunUsageError(f"--detector {path}: cannot load ONNX: {e}") from e
    extra = {PREPROCESS_EXTRA_FILE: "", EXTRA_FILES["config"]: "", EXTRA_FILES["provenance"]: ""}
    try:
        det = torch.jit.load(path, map_location=device, _extra_files=extra)
    except Exception as e:
        raise RunUsageError(f"--detector {path}: cannot load TorchScript: {e}") from e
    meta: Dict[str, Any] = {}
    if extra[EXTRA_FILES["config"]]:
        # A file from `torchdefects export --detector`: run its detector with its config.
        if not hasattr(det, "detector"):
            raise RunUsageError(
                f"--detector {path} holds a DefectHead but no detector: run it on --maps"
            )
        map_output = getattr(det, "key", None)
        if map_output is None and hasattr(det, "index"):
            map_output = int(det.index)
        meta["embedded"] = {
            "config": json.loads(extra[EXTRA_FILES["config"]]),
            "provenance": json.loads(extra[EXTRA_FILES["provenance"]] or "null"),
            "map_output": map_output,
        }
        det = det.detector
    if extra[PREPROCESS_EXTRA_FILE]:
        try:
            meta.update(json.loads(extra[PREPROCESS_EXTRA_FILE]))
        except ValueError as e:
            raise RunUsageError(f"--detector {path}: bad {PREPROCESS_EXTRA_FILE}: {e}") from e
    det.eval()
    return det, meta


def preprocess_from(
    meta: Dict[str, Any], input_size: Any, mean: Any, std: Any, center_crop: Optional[bool]
) -> Preprocess:
    """The detector's preprocessing: flags win over its metadata (``preprocess.json``)."""
    size = input_size if input_size is not None else meta.get("input_size")
    mean = mean if mean is not None else meta.get("mean")
    std = std if std is not None else meta.get("std")
    crop = center_crop if center_crop is not None else bool(meta.get("center_crop"))
    if crop and size is None:
        raise RunUsageError("--center-crop needs --input-size H W (or the detector's metadata)")
    return Preprocess(
        tuple(int(v) for v in size) if size is not None else None,  # type: ignore[arg-type]
        tuple(float(v) for v in mean) if mean is not None else None,
        tuple(float(v) for v in std) if std is not None else None,
        crop,
    )


def make_plan(opts: RunOptions, r: dist.Ranks) -> Plan:
    _check_options(opts)
    cfg = _load_config(opts)
    mask_format, mask_dir, overlay_dir = _output_dirs(opts, cfg)
    kind = "maps" if opts.maps is not None else "images"
    spec = opts.maps if opts.maps is not None else opts.images
    assert spec is not None
    exclude = [d for d in (opts.out, mask_dir, overlay_dir) if d is not None]
    paths, root = list_run_inputs(spec, kind, exclude, flag="--" + kind)
    try:
        device = check_device(opts.device, r.local_rank)
    except ValueError as e:
        raise RunUsageError(str(e)) from e
    detector = prep = None
    map_output = opts.map_output
    embedded = None
    if kind == "images":
        assert opts.detector is not None
        detector, meta = load_detector(opts.detector, device)
        prep = preprocess_from(meta, opts.input_size, opts.mean, opts.std, opts.center_crop)
        embedded = meta.get("embedded")
    enabled = opts.defects if opts.defects is not None else getattr(cfg, "enabled", True)
    threshold = provenance = None
    if embedded is not None:
        cfg, map_output = _adopt_embedded(opts, embedded)
        threshold, provenance = cfg.pixel_threshold, embedded["provenance"]
    elif enabled:
        threshold, provenance = _threshold(opts, cfg, device, detector, prep)
        cfg = dataclasses.replace(cfg, pixel_threshold=threshold)
    names = output_names(paths, root)
    return Plan(kind, paths, names, cfg, bool(enabled), threshold, provenance,
                 mask_format, mask_dir, overlay_dir, device, detector, prep,
                 map_output)  # fmt: skip


#: Flags that set what an exported detector + head file already fixes.
_EMBEDDED_CLASH = ("config", "category", "pixel_threshold", "pixel_threshold_strategy",
                   "pixel_normal_quantile", "train_dir", "map_output",
                   "defects_mask_space")  # fmt: skip


def _adopt_embedded(opts: RunOptions, embedded: Dict[str, Any]) -> Tuple[DefectsConfig, Any]:
    """The config and map output of a detector file that already holds a DefectHead."""
    given = [f"--{n.replace('_', '-')}" for n in _EMBEDDED_CLASH if getattr(opts, n) is not None]
    given += [f"--{n.replace('_', '-')}" for n in opts.overrides]
    if given:
        raise RunUsageError(
            f"--detector {opts.detector} already holds a DefectHead with its config; "
            f"{', '.join(given)} would contradict it: drop them (or export the detector alone)"
        )
    cfg = DefectsConfig(**embedded["config"])
    if cfg.pixel_threshold is None:
        raise RunUsageError(
            f"--detector {opts.detector}: its embedded config has no pixel_threshold"
        )
    return cfg, embedded["map_output"]


def settings(opts: RunOptions, plan: Plan) -> Dict[str, Any]:
    """What the results depend on: compared by ``--resume`` (journal.check_manifest)."""
    prov = dict(plan.provenance or {})
    prov.pop("created_at", None)
    cfg = plan.cfg.to_dict()
    cfg.pop("pixel_threshold_provenance", None)
    return {
        "config": cfg,
        "defects_enabled": plan.defects,
        "pixel_threshold": plan.threshold,
        "pixel_threshold_provenance": prov,
        "inputs": {
            "kind": plan.kind,
            "count": len(plan.paths),
            "fingerprint": journal.fingerprint(plan.paths),
        },
        "outputs": {
            "mask_format": plan.mask_format,
            "mask_dir": plan.mask_dir,
            "mask_space": opts.mask_space,
            "overlay_dir": plan.overlay_dir,
            "regions_jsonl": opts.regions_jsonl,
            "image_size": list(opts.image_size) if opts.image_size else None,
        },
        "detector": None
        if plan.detector is None
        else {
            "path": opts.detector,
            "map_output": opts.map_output,
            "preprocess": dataclasses.asdict(plan.prep) if plan.prep else None,
        },
    }


def versions() -> Dict[str, str]:
    from torchdefects import __version__

    return {"torchdefects": __version__, "torch": torch.__version__, "numpy": np.__version__}
