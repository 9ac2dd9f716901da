"""Evaluate a folder of anomaly maps against ground-truth masks; ``torchdefects evaluate``.

Library: :func:`evaluate_dir` (metrics, optional threshold sweep, ``metrics.json`` and a
sweep plot), :func:`calibrate_supervised` (``segf1`` pixel threshold and an image threshold
from labelled folders), :func:`pair_ground_truth` and :func:`read_gt_mask`.
CLI: :func:`add_evaluate_command` adds the ``evaluate`` subcommand to an argparse
subparsers object; :func:`add_supervised_calibrate_arguments` and
:func:`run_supervised_calibrate` are what ``calibrate --strategy segf1`` needs.

Ground truth: a mask per map, matched by file stem (the path relative to the folder
without extension first, else the bare file name without extension when that is unique).
A PNG mask is defective where it is nonzero (0/255 masks), a ``.npy`` mask where it is
nonzero or True. A map without a mask is a normal part (all-zero ground truth). A mask
without a map is reported (``unused_gt_masks``) and not evaluated.

Maps only: ``--images`` with ``--detector`` is not supported by this command yet; write
the maps first (``torchdefects run --save-maps`` or your detector) and evaluate them.
"""

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from torchdefects import files as _files
from torchdefects._check import check_device
from torchdefects.config import DefectsConfig, load_config
from torchdefects.metrics import DefectMetrics
from torchdefects.supervised import (
    image_threshold_f1,
    image_threshold_normal_quantile,
    segf1_threshold,
)

__all__ = [
    "GT_EXTENSIONS",
    "add_evaluate_command",
    "add_supervised_calibrate_arguments",
    "calibrate_supervised",
    "evaluate_dir",
    "pair_ground_truth",
    "read_gt_mask",
    "render_sweep_plot",
    "run_supervised_calibrate",
    "write_demo_maps",
]

GT_EXTENSIONS: Tuple[str, ...] = (".png", ".npy")


# ----------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------


def _stem(path: str, root: str) -> str:
    rel = os.path.relpath(path, root)
    return os.path.splitext(rel)[0].replace(os.sep, "/")


def pair_ground_truth(
    maps: str, gt_masks: Optional[str], extensions: Optional[Sequence[str]] = None
) -> Tuple[List[Tuple[str, Optional[str]]], List[str]]:
    """Pair every map with its ground-truth mask by file stem.

    Args:
        maps: folder (recursive), glob or file of anomaly maps.
        gt_masks: folder of masks (PNG or ``.npy``), or ``None`` (every part normal).
        extensions: the inputs' extensions (default: maps'; images' for ``--images``).

    Returns:
        ``(pairs, unused)``: ``(map_path, mask_path or None)`` in map path order, and the
        masks that match no map.

    Raises:
        FileNotFoundError: no map, or ``gt_masks`` is not a folder.
        ValueError: two masks share a stem (``a.png`` and ``a.npy``).
    """
    paths = _files.list_inputs(maps, extensions or _files.MAP_EXTENSIONS)
    root = _files.input_root(maps)
    if gt_masks is None:
        return [(p, None) for p in paths], []
    if not os.path.isdir(gt_masks):
        raise FileNotFoundError(f"gt_masks: {gt_masks!r} is not a folder")
    try:
        masks = _files.list_inputs(gt_masks, GT_EXTENSIONS)
    except FileNotFoundError:
        masks = []  # an empty folder: every part is normal
    by_rel: Dict[str, str] = {}
    by_name: Dict[str, List[str]] = {}
    for m in masks:
        rel = _stem(m, gt_masks)
        if rel in by_rel:
            raise ValueError(f"gt_masks: two masks for {rel!r}: {by_rel[rel]} and {m}")
        by_rel[rel] = m
        by_name.setdefault(os.path.basename(rel), []).append(m)
    used = set()
    pairs: List[Tuple[str, Optional[str]]] = []
    for p in paths:
        rel = _stem(p, root)
        gt = by_rel.get(rel)
        if gt is None:
            same = by_name.get(os.path.basename(rel), [])
            gt = same[0] if len(same) == 1 else None
        if gt is not None:
            used.add(gt)
        pairs.append((p, gt))
    return pairs, [m for m in masks if m not in used]


def read_gt_mask(path: Optional[str], shape: Sequence[int]) -> np.ndarray:
    """A ground-truth mask as bool (H, W); ``None`` gives an all-False (normal) mask.

    Raises:
        ValueError: unreadable file, or a shape other than ``shape`` (named with the path).
    """
    shape = tuple(int(s) for s in shape)
    if path is None:
        return np.zeros(shape, dtype=bool)
    if path.lower().endswith(".npy"):
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as e:
            raise ValueError(f"{path}: cannot read mask: {type(e).__name__}: {e}") from e
        arr = np.asarray(arr)
        while arr.ndim > 2 and arr.shape[0] == 1:
            arr = arr[0]
        mask = arr != 0
    else:
        mask = _files.read_map(path) != 0
    if mask.shape != shape:
        raise ValueError(
            f"{path}: mask shape {list(mask.shape)} does not match its map's {list(shape)}"
        )
    return np.ascontiguousarray(mask)


def _batches(
    pairs: List[Tuple[str, Optional[str]]],
    batch_size: int,
    load: Optional[Callable[[str], np.ndarray]] = None,
) -> Any:
    """Yield (maps, masks, paths) batches of equal-shape maps, in order; ``load`` turns an
    input path into its map (default: read the map file)."""
    maps: List[np.ndarray] = []
    gts: List[np.ndarray] = []
    names: List[str] = []
    for path, gt in pairs:
        m = _files.read_map(path) if load is None else load(path)
        g = read_gt_mask(gt, m.shape)
        if maps and (maps[0].shape != m.shape or len(maps) >= batch_size):
            yield np.stack(maps), np.stack(gts), names
            maps, gts, names = [], [], []
        maps.append(m)
        gts.append(g)
        names.append(path)
    if maps:
        yield np.stack(maps), np.stack(gts), names


def _load(config: Any, category: Optional[str]) -> DefectsConfig:
    if config is None:
        return DefectsConfig()
    if isinstance(config, DefectsConfig):
        return config
    return load_config(config, category)


# ----------------------------------------------------------------------------
# Library
# ----------------------------------------------------------------------------


def _sweep_thresholds(metrics: DefectMetrics, steps: int, extra: List[float]) -> List[float]:
    """``steps`` thresholds evenly spaced from the median negative pixel to the highest
    positive pixel (the range where the trade-off happens), plus ``extra``."""
    c = metrics.curve()
    if c.thresholds.size == 0:
        return sorted(set(extra))
    if c.negatives:
        i = int(np.searchsorted(c.fp, (c.negatives + 1) // 2))
        lo = float(c.thresholds[min(i, c.thresholds.size - 1)])
    else:
        lo = float(c.thresholds[-1])
    if c.positives:
        hi = float(c.thresholds[int(np.searchsorted(c.tp, 1))])
    else:
        hi = float(c.thresholds[0])
    if not (np.isfinite(lo) and np.isfinite(hi)):
        finite = c.thresholds[np.isfinite(c.thresholds)]
        lo, hi = float(finite.min()), float(finite.max())
    grid = np.linspace(lo, hi, steps) if steps > 1 else np.array([hi])
    return sorted(set(float(t) for t in grid) | set(float(t) for t in extra))


def evaluate_dir(
    maps: str,
    gt_masks: Optional[str],
    config: Any = None,
    category: Optional[str] = None,
    out: Optional[str] = None,
    sweep: int = 0,
    fpr_limit: float = 0.3,
    bins: Optional[int] = None,
    batch_size: int = 16,
    device: str = "cpu",
    load: Optional[Callable[[str], np.ndarray]] = None,
    extensions: Optional[Sequence[str]] = None,
) -> Dict[str, Any]:
    """Evaluate a folder of maps against ground-truth masks.

    Args:
        maps: folder (recursive), glob or file of anomaly maps (see ``read_map``).
        gt_masks: folder of masks matched by stem (see :func:`pair_ground_truth`); ``None``
            treats every part as normal.
        config: a :class:`~torchdefects.DefectsConfig`, a config file path or dict, or
            ``None`` (threshold-free metrics only).
        category: the config's category (see :func:`~torchdefects.load_config`).
        out: folder to write ``metrics.json`` (and ``sweep.png`` with ``sweep``) into.
        sweep: number of evenly spaced thresholds for the trade-off table (0 = none); the
            configured and the ``segf1`` thresholds are added. Costs one more pass.
        fpr_limit, bins: see :class:`~torchdefects.DefectMetrics`.
        batch_size: maps per batch.
        device: where the metrics run.
        load, extensions: inputs that are not map files, such as images scored by a
            detector (``evaluate --images --detector``): ``load(path) -> (H, W) map``.

    Returns:
        the ``metrics.json`` content: ``metrics`` (see :meth:`DefectMetrics.compute`),
        ``segf1`` (threshold and provenance, when there are defect pixels), ``sweep`` rows,
        ``inputs`` (counts, unused masks), ``config``.

    Example:
        >>> r = evaluate_dir("maps/", "gt/", "config.json", out="eval/", sweep=20)  # doctest: +SKIP
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if isinstance(sweep, bool) or not isinstance(sweep, int) or sweep < 0:
        raise ValueError(f"sweep must be an int >= 0, got {sweep!r}")
    cfg = _load(config, category)
    dev = check_device(str(device))
    pairs, unused = pair_ground_truth(maps, gt_masks, extensions)
    metrics = DefectMetrics(cfg, fpr_limit=fpr_limit, bins=bins)
    t0 = time.perf_counter()
    for m, g, _ in _batches(pairs, batch_size, load):
        metrics.update(torch.from_numpy(m).to(dev), torch.from_numpy(g).to(dev))
    result: Dict[str, Any] = {
        "metrics": metrics.compute(),
        "config": cfg.to_dict(),
        "inputs": {
            "maps": os.fspath(maps),
            "gt_masks": None if gt_masks is None else os.fspath(gt_masks),
            "map_count": len(pairs),
            "maps_with_gt_mask": sum(1 for _, g in pairs if g is not None),
            "unused_gt_masks": unused,
        },
    }
    segf1 = None
    if result["metrics"]["positive_pixels"]:
        thr, prov = segf1_threshold(metrics)
        segf1 = {"pixel_threshold": thr, "provenance": prov}
    result["segf1"] = segf1
    rows: List[Dict[str, Any]] = []
    if sweep:
        extra = [cfg.pixel_threshold, segf1["pixel_threshold"] if segf1 else None]
        extra = [t for t in extra if t is not None]
        thresholds = _sweep_thresholds(metrics, sweep, [float(t) for t in extra])
        runs = [
            DefectMetrics(replace(cfg, pixel_threshold=t), threshold_free=False) for t in thresholds
        ]
        for m, g, _ in _batches(pairs, batch_size, load):
            x, y = torch.from_numpy(m).to(dev), torch.from_numpy(g).to(dev)
            for run in runs:
                run.update(x, y)
        for t, run in zip(thresholds, runs):
            r = run.compute()
            rows.append(
                {
                    "pixel_threshold": t,
                    "pixel_f1": r["pixel"]["f1"],
                    "pixel_precision": r["pixel"]["precision"],
                    "pixel_recall": r["pixel"]["recall"],
                    "region_recall": r["region"]["recall"],
                    "region_precision": r["region"]["precision"],
                    "false_alarms": r["region"]["false_alarms"],
                    "false_alarms_per_image": r["region"]["false_alarms"] / max(r["images"], 1),
                    "false_alarms_per_normal_image": r["region"]["false_alarms_per_normal_image"],
                    "configured": cfg.pixel_threshold is not None and t == cfg.pixel_threshold,
                    "segf1": segf1 is not None and t == segf1["pixel_threshold"],
                }
            )
    result["sweep"] = rows
    result["seconds"] = time.perf_counter() - t0
    if out is not None:
        os.makedirs(out, exist_ok=True)
        _files.atomic_write_json(os.path.join(out, "metrics.json"), _files.json_safe(result))
        if rows:
            render_sweep_plot(
                rows,
                os.path.join(out, "sweep.png"),
                cfg.pixel_threshold,
                segf1["pixel_threshold"] if segf1 else None,
            )
    return result


def calibrate_supervised(
    maps: str,
    gt_masks: str,
    config: Any = None,
    category: Optional[str] = None,
    image_strategy: Optional[str] = None,
    image_q: float = 0.99,
    roi_xyxy_norm: Optional[Sequence[float]] = None,
    batch_size: int = 16,
    device: str = "cpu",
) -> Dict[str, Any]:
    """The ``segf1`` pixel threshold (and an image threshold) from labelled folders.

    Args:
        maps, gt_masks: as :func:`evaluate_dir` (a map without a mask is normal).
        config, category: the config whose ROI is used (``roi_xyxy_norm`` overrides it).
        image_strategy: ``None``, ``"f1"`` (best image F1, labels from the masks) or
            ``"normal_quantile"`` (``image_q``-quantile of the normal images' scores).
        image_q: the quantile for ``normal_quantile``.

    Returns:
        ``{"pixel_threshold", "pixel_threshold_provenance", "image_threshold",
        "image_threshold_provenance"}`` (the image ones ``None`` without a strategy).

    Raises:
        ValueError: no defect pixel in the ground truth, a bad strategy, or bad files.
    """
    if image_strategy not in (None, "f1", "normal_quantile"):
        raise ValueError(
            f"image_strategy must be None, 'f1' or 'normal_quantile', got {image_strategy!r}"
        )
    cfg = _load(config, category)
    roi = roi_xyxy_norm if roi_xyxy_norm is not None else cfg.roi_xyxy_norm
    metrics = DefectMetrics(DefectsConfig(roi_xyxy_norm=roi))
    pairs, _ = pair_ground_truth(maps, gt_masks)
    dev = check_device(str(device))
    for m, g, _ in _batches(pairs, batch_size):
        metrics.update(torch.from_numpy(m).to(dev), torch.from_numpy(g).to(dev))
    thr, prov = segf1_threshold(metrics)
    out: Dict[str, Any] = {
        "pixel_threshold": thr,
        "pixel_threshold_provenance": prov,
        "image_threshold": None,
        "image_threshold_provenance": None,
    }
    scores, labels = metrics.image_scores()
    if image_strategy == "f1":
        out["image_threshold"], out["image_threshold_provenance"] = image_threshold_f1(
            scores, labels
        )
    elif image_strategy == "normal_quantile":
        out["image_threshold"], out["image_threshold_provenance"] = image_threshold_normal_quantile(
            scores, labels, image_q
        )
    if out["image_threshold_provenance"] is not None:
        out["image_threshold_provenance"]["image_score"] = "roi_max"
    return out


def write_demo_maps(demo_out: str, device: str = "cpu") -> Tuple[str, str, str]:
    """Anomaly maps of the demo's test images, for evaluating the demo (docs/evaluation.md).

    ``torchdefects demo`` (:func:`torchdefects.demo.run_demo`) writes the test images, their
    planted-defect masks (``data/ground_truth``, PNG 0/255, none for normal parts) and the
    model; this runs the demo's detector over the test images (RGB / 255, the demo's
    preprocessing) and writes ``maps/<name>.npy``.

    Returns:
        ``(maps_dir, gt_masks_dir, config_path)``.
    """
    meta_key = "torchdefects/preprocess.json"
    extra = {meta_key: ""}
    detector = torch.jit.load(
        os.path.join(demo_out, "model", "detector.pt"), map_location=device, _extra_files=extra
    )
    meta = json.loads(extra[meta_key] or "{}")
    if meta.get("mean") is not None or meta.get("std") is not None:
        raise ValueError("write_demo_maps handles the demo's detector only (no mean/std)")
    test = os.path.join(demo_out, "data", "test")
    maps_dir = os.path.join(demo_out, "maps")
    os.makedirs(maps_dir, exist_ok=True)
    for path in _files.list_inputs(test, _files.IMAGE_EXTENSIONS):
        rgb = np.array(_files.read_image(path))  # writable copy for torch
        x = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).float().to(device) / 255.0
        with torch.inference_mode():
            amap = detector(x)
        name = os.path.splitext(os.path.basename(path))[0] + ".npy"
        np.save(os.path.join(maps_dir, name), amap.reshape(amap.shape[-2:]).cpu().numpy())
    return (
        maps_dir,
        os.path.join(demo_out, "data", "ground_truth"),
        os.path.join(demo_out, "model", "config.json"),
    )


# ----------------------------------------------------------------------------
# Plot (Pillow only)
# ----------------------------------------------------------------------------


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def render_sweep_plot(
    rows: List[Dict[str, Any]],
    path: str,
    configured: Optional[float] = None,
    segf1: Optional[float] = None,
) -> None:
    """Draw threshold vs pixel F1, region recall (left axis, 0..1) and false alarms per
    image (right axis) as a PNG, with markers at the configured and ``segf1`` thresholds."""
    from PIL import Image, ImageDraw

    w, h = 900, 580
    left, right, top, bottom = 95, 105, 100, 70
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    f, fs, fb = _font(15), _font(13), _font(18)
    xs = [r["pixel_threshold"] for r in rows]
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 0.5, x_hi + 0.5
    fa = [r["false_alarms_per_image"] for r in rows]
    fa_hi = max(fa) if fa and max(fa) > 0 else 1.0
    pw, ph = w - left - right, h - top - bottom
    fa_color = (200, 60, 20)

    def px(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * pw

    def py(y: float, hi: float = 1.0) -> float:
        return top + ph - y / hi * ph

    def vertical_text(text: str, cx: float, cy: float, color: Any) -> None:
        box = d.textbbox((0, 0), text, font=f)
        tile = Image.new("RGB", (box[2] + 4, box[3] + 4), "white")
        ImageDraw.Draw(tile).text((2, 2), text, fill=color, font=f)
        tile = tile.rotate(90, expand=True)
        img.paste(tile, (int(cx - tile.width / 2), int(cy - tile.height / 2)))

    d.rectangle([left, top, left + pw, top + ph], outline="black")
    for i in range(6):
        v = i / 5
        y = py(v)
        d.line([left, y, left + pw, y], fill=(225, 225, 225))
        d.line([left - 5, y, left, y], fill="black")
        d.text((left - 8, y), f"{v:.1f}", fill="black", font=fs, anchor="rm")
        d.line([left + pw, y, left + pw + 5, y], fill="black")
        d.text((left + pw + 8, y), f"{v * fa_hi:.3g}", fill=fa_color, font=fs, anchor="lm")
    for i in range(6):
        xv = x_lo + (x_hi - x_lo) * i / 5
        x = px(xv)
        d.line([x, top + ph, x, top + ph + 5], fill="black")
        d.text((x, top + ph + 8), f"{xv:.4g}", fill="black", font=fs, anchor="mt")
    d.text((left + pw / 2, h - 22), "pixel threshold", fill="black", font=f, anchor="mm")
    vertical_text("pixel F1, region recall", 30, top + ph / 2, (0, 0, 0))
    vertical_text("false alarms per image", w - 28, top + ph / 2, fa_color)
    d.text((w / 2, 20), "Threshold trade-off", fill="black", font=fb, anchor="mm")

    def series(values: List[Optional[float]], color: Any, hi: float = 1.0) -> None:
        pts = [(px(x), py(v, hi)) for x, v in zip(xs, values) if v is not None]
        if len(pts) > 1:
            d.line(pts, fill=color, width=3)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)

    series([r["pixel_f1"] for r in rows], (30, 90, 200))
    series([r["region_recall"] for r in rows], (20, 150, 60))
    series(fa, fa_color, fa_hi)
    markers = [(configured, (90, 90, 90), "configured"), (segf1, (150, 40, 160), "segf1")]
    for k, (t, color, name) in enumerate(markers):
        if t is None or not x_lo <= t <= x_hi:
            continue
        x = px(t)
        for y in range(top, top + ph, 10):
            d.line([x, y, x, min(y + 5, top + ph)], fill=color, width=2)
        # Labels sit just above the plot, at their marker, on two rows so they never overlap.
        d.text((x, top - 6 - 16 * k), f"{name} {t:.4g}", fill=color, font=fs, anchor="mb")
    legend = [
        ("pixel F1", (30, 90, 200)),
        ("region recall", (20, 150, 60)),
        ("false alarms per image (right axis)", fa_color),
    ]
    x0 = left
    for name, color in legend:
        d.line([x0, 44, x0 + 24, 44], fill=color, width=3)
        d.text((x0 + 30, 44), name, fill="black", font=fs, anchor="lm")
        x0 += 40 + int(d.textlength(name, font=fs))
    tmp = path + ".tmp.png"
    img.save(tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def format_table(result: Dict[str, Any]) -> str:
    """The short summary the CLI prints."""
    m = result["metrics"]
    lines = [
        f"images {m['images']} ({m['defective_images']} defective, {m['normal_images']} normal), "
        f"{m['defects']} ground-truth defects, {m['pixels']} pixels ({m['mode']})",
        f"pixel  AUROC {_fmt(m['pixel_auroc'])}  AUPRO@{m['fpr_limit']:g} {_fmt(m['pixel_aupro'])}",
    ]
    if m["pixel"] is not None:
        p = m["pixel"]
        lines.append(
            f"pixel  @ {p['threshold']:.6g}: precision {_fmt(p['precision'])}  recall "
            f"{_fmt(p['recall'])}  F1 {_fmt(p['f1'])}  IoU {_fmt(p['iou'])}"
        )
        r = m["region"]
        lines.append(
            f"region @ {p['threshold']:.6g}: recall {_fmt(r['recall'])} ({r['found']}/"
            f"{r['defects']})  precision {_fmt(r['precision'])}  false alarms {r['false_alarms']}"
            f" ({_fmt(r['false_alarms_per_normal_image'])} per normal image)  recall@IoU0.5 "
            f"{_fmt(r['recall_iou50'])}"
        )
    im = m["image"]
    line = f"image  AUROC {_fmt(im['auroc'])}"
    if "f1" in im:
        line += f"  F1 {_fmt(im['f1'])} ({im['decision']})"
    line += f"  best F1 {_fmt(im['best_f1'])} at {_fmt(im['best_f1_threshold'])}"
    lines.append(line)
    if result.get("segf1"):
        s = result["segf1"]
        lines.append(
            f"segf1  pixel_threshold {s['pixel_threshold']:.6g} reaches pixel F1 "
            f"{s['provenance']['f1']:.4f}"
        )
    if result["sweep"]:
        lines.append("")
        lines.append(
            f"{'threshold':>12} {'pixel F1':>9} {'region rec':>10} {'FA/image':>9} {'FA/normal':>9}"
        )
        for row in result["sweep"]:
            mark = " <- configured" if row["configured"] else ""
            mark += " <- segf1" if row["segf1"] else ""
            lines.append(
                f"{row['pixel_threshold']:>12.6g} {_fmt(row['pixel_f1']):>9} "
                f"{_fmt(row['region_recall']):>10} {_fmt(row['false_alarms_per_image']):>9} "
                f"{_fmt(row['false_alarms_per_normal_image']):>9}{mark}"
            )
    return "\n".join(lines)


def add_evaluate_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``evaluate`` to an argparse subparsers object; its ``func`` returns an exit code.

    Exit codes: 0 ok, 1 failure, 2 usage error (bad arguments, files or config).
    """
    p = subparsers.add_parser(
        "evaluate",
        help="pixel, region and image metrics of maps against ground-truth masks",
        description=(
            "Evaluate anomaly maps against ground-truth masks (matched by file stem; a map "
            "without a mask is a normal part) at the config's settings: pixel precision, "
            "recall, F1, IoU, pixel AUROC and AUPRO@0.3, region recall, precision and false "
            "alarms, image AUROC and F1; writes OUT/metrics.json. See docs/evaluation.md."
        ),
    )
    from torchdefects.batch.plan import add_detector_arguments

    g = p.add_argument_group("inputs (--maps, or --images with --detector)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--maps", help="folder (recursive), glob or file of maps")
    src.add_argument("--images", help="images scored by --detector (as torchdefects run)")
    add_detector_arguments(g)
    g.add_argument("--gt-masks", metavar="DIR", help="ground-truth masks (PNG 0/255 or .npy)")
    g.add_argument("--config", help="config file (default: threshold-free metrics only)")
    g.add_argument("--category", metavar="NAME", help="the config's category")
    g = p.add_argument_group("evaluation")
    g.add_argument(
        "--sweep",
        type=int,
        default=0,
        metavar="N",
        help="also evaluate N thresholds (table, sweep.png); one more pass over the maps",
    )
    g.add_argument("--fpr-limit", type=float, default=0.3, help="AUPRO FPR limit (0.3)")
    g.add_argument(
        "--bins",
        type=int,
        default=None,
        metavar="M",
        help="bounded memory: round values down to M mantissa bits (default exact)",
    )
    g = p.add_argument_group("output and execution")
    g.add_argument("-o", "--out", required=True, metavar="OUT", help="folder for metrics.json")
    g.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N (default cpu)")
    g.add_argument("--batch-size", type=int, default=16, help="maps per batch (default 16)")
    g.add_argument("--quiet", action="store_true", help="print nothing")
    p.set_defaults(func=_cmd_evaluate)
    return p


def _image_inputs(args: argparse.Namespace) -> Tuple[Any, Any]:
    """``(load, extensions)`` for ``--images --detector``; ``(None, None)`` for maps."""
    from torchdefects.batch.options import RunUsageError
    from torchdefects.batch.plan import images_through_detector

    paths = None
    if args.images is not None:
        paths = _files.list_inputs(args.images, _files.IMAGE_EXTENSIONS)
    try:
        load = images_through_detector(args, paths, check_device(str(args.device)))
    except RunUsageError as e:
        raise ValueError(str(e)) from e
    return load, (None if load is None else _files.IMAGE_EXTENSIONS)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from torchdefects.config import ConfigError

    prog = "torchdefects evaluate"
    try:
        load, extensions = _image_inputs(args)
        result = evaluate_dir(
            args.maps if args.images is None else args.images,
            args.gt_masks,
            config=args.config,
            category=args.category,
            out=args.out,
            sweep=args.sweep,
            fpr_limit=args.fpr_limit,
            bins=args.bins,
            batch_size=args.batch_size,
            device=args.device,
            load=load,
            extensions=extensions,
        )
    except (ConfigError, FileNotFoundError, ValueError, TypeError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"{prog}: failed: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(format_table(result))
        print(f"-> {os.path.join(args.out, 'metrics.json')}")
        if result["inputs"]["unused_gt_masks"]:
            n = len(result["inputs"]["unused_gt_masks"])
            print(
                f"{prog}: {n} ground-truth masks match no map (listed in metrics.json)",
                file=sys.stderr,
            )
    return 0


def add_supervised_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--strategy``, ``--gt-masks``, ``--image-strategy``, ``--image-q`` to the
    ``calibrate`` parser (all suppressed when not set, as the rest of ``calibrate``)."""
    g = parser.add_argument_group("supervised calibration (docs/evaluation.md)")
    g.add_argument(
        "--strategy",
        choices=("normal_quantile", "segf1"),
        default=argparse.SUPPRESS,
        help="pixel threshold: q-quantile of normal maps (default) or segf1 (best pixel F1 "
        "against --gt-masks)",
    )
    g.add_argument(
        "--gt-masks",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="ground-truth masks for --strategy segf1 (a map without one is normal)",
    )
    g.add_argument(
        "--image-strategy",
        choices=("f1", "normal_quantile"),
        default=argparse.SUPPRESS,
        help="also set image_threshold: best image F1, or a quantile of normal image scores",
    )
    g.add_argument(
        "--image-q",
        type=float,
        default=argparse.SUPPRESS,
        help="quantile for --image-strategy normal_quantile (default 0.99)",
    )


def run_supervised_calibrate(args: argparse.Namespace, raw: Dict[str, Any]) -> Dict[str, Any]:
    """``calibrate --strategy segf1``: a copy of config dict ``raw`` with the thresholds set.

    ``args`` holds ``maps``, ``gt_masks`` and optionally ``category``, ``roi_xyxy_norm``,
    ``image_strategy``, ``image_q``, ``device``, ``batch_size``. Raises ValueError for bad
    input (the caller maps it to a usage error).
    """
    from torchdefects.config import set_pixel_threshold, validate_config_dict

    gt = getattr(args, "gt_masks", None)
    if gt is None:
        raise ValueError("--strategy segf1 needs --gt-masks DIR")
    category = getattr(args, "category", None)
    configs = validate_config_dict(raw)
    base = configs.get(category, configs[""]) if category else configs[""]
    res = calibrate_supervised(
        args.maps,
        gt,
        config=base,
        image_strategy=getattr(args, "image_strategy", None),
        image_q=getattr(args, "image_q", 0.99),
        roi_xyxy_norm=getattr(args, "roi_xyxy_norm", None),
        batch_size=getattr(args, "batch_size", 16),
        device=str(getattr(args, "device", "cpu")),
    )
    out = set_pixel_threshold(
        raw,
        res["pixel_threshold"],
        res["pixel_threshold_provenance"],
        category=category,
        roi_xyxy_norm=getattr(args, "roi_xyxy_norm", None),
    )
    if res["image_threshold"] is not None:
        block = out["defects"] if category is None else out["per_category"][category]["defects"]
        block["image_threshold"] = res["image_threshold"]
        block["image_threshold_provenance"] = res["image_threshold_provenance"]
    return out
