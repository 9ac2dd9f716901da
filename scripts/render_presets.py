"""Render docs/img/preset_*.png: what each defects preset does on the demo parts.

Makes the demo's surfaces and detector (``torchdefects.demo``), calibrates the threshold on
normal maps as the demo does (q = 0.9999), plants a scratch, a spot and a hole (plus a
broken scratch and speckle), and runs :func:`toolbox_pipeline`, the toolbox stages in the
order the head is to call them, once per preset. Each picture: the three parts side by
side, the reported regions' outlines in red, their bboxes in yellow; under it the number
of regions. Palette PNGs, about 30 KB each.

Usage::

    python scripts/render_presets.py [--out docs/img]
"""

import argparse
import os
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw

from torchdefects import (
    binarize,
    closing,
    connected_components,
    dilate_ellipse,
    fill_holes,
    finalize_regions,
    hysteresis_bounds,
    hysteresis_threshold,
    merge_nearby,
    opening,
    quantile_keep,
    region_keep,
    region_stats,
    roi_mask,
    smooth_map,
    solidity,
)
from torchdefects.demo import PatchGaussianDetector, _plant, _to_rgb_u8, make_surface
from torchdefects.filters import border_ignore
from torchdefects.overlay import mask_outline
from torchdefects.presets import list_presets, preset_config
from torchdefects.regions import Regions
from torchdefects.roi import roi_tensor

BASE: Dict[str, Any] = {"open_ksize": 0, "close_ksize": 0, "fill_holes": False, "min_area": 0}


def toolbox_pipeline(
    amap: torch.Tensor, thr: torch.Tensor, keys: Dict[str, Any]
) -> Tuple[torch.Tensor, Regions]:
    """The head's order with every toolbox stage, driven by config keys; eager reference."""
    g = keys.get
    b, h, w = amap.shape[0], amap.shape[2], amap.shape[3]
    conn = g("connectivity", 8)
    x = border_ignore(amap, g("border_ignore_px", 0))
    x = smooth_map(
        x,
        g("map_smoothing_method", "none"),
        g("map_smoothing_ksize", 0),
        g("map_smoothing_sigma", 0.0),
    )
    roi = roi_tensor(g("roi_xyxy_norm")) if g("roi_xyxy_norm") is not None else None
    if g("hysteresis_enabled", False):
        lo, hi = hysteresis_bounds(thr, g("hysteresis_low"), g("hysteresis_high"))
        mask = hysteresis_threshold(x, lo, hi, conn, roi)
    else:
        mask = binarize(x, thr, roi)
    if g("open_ksize", 0):
        mask = opening(mask, g("open_ksize"))
    if g("close_ksize", 0):
        mask = closing(mask, g("close_ksize"))
    if g("fill_holes", False):
        mask = fill_holes(mask)
    mask = dilate_ellipse(mask, g("mask_dilate_ksize", 0))
    if roi is not None:
        mask = mask & roi_mask(roi, h, w)
    labels, counts = connected_components(mask, conn)
    regions = region_stats(labels, counts, x)
    sol = solidity(labels, regions) if g("min_solidity") is not None else None
    keep = region_keep(
        regions,
        g("min_area", 0),
        g("min_score_max"),
        g("min_score_mean"),
        g("min_fill_ratio"),
        g("max_aspect_ratio"),
        g("min_solidity"),
        sol,
    )
    if g("merge_nearby_enabled", False):
        merged = merge_nearby(labels, regions, keep, b, g("merge_nearby_max_gap_px", 0), x)
        labels, regions, keep = merged.labels, merged.regions, merged.keep
    if g("min_score_max_quantile") is not None:
        keep = quantile_keep(regions, keep, b, g("min_score_max_quantile"))
    labels, regions, _, _ = finalize_regions(
        labels, regions, keep, b, g("max_regions_sort_by", "score_max"), g("max_regions")
    )
    return labels, regions


def demo_parts(seed: int = 0, size: int = 128) -> Tuple[np.ndarray, torch.Tensor, float]:
    rng = np.random.default_rng(seed)

    def to_tensor(grays: List[np.ndarray]) -> torch.Tensor:
        u8 = np.stack([_to_rgb_u8(gr) for gr in grays])
        return torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255.0

    detector = PatchGaussianDetector.fit(to_tensor([make_surface(rng, size) for _ in range(24)]))
    with torch.inference_mode():
        calib = detector(to_tensor([make_surface(rng, size) for _ in range(8)]))
    thr = float(np.quantile(calib.numpy().reshape(-1).astype(np.float64), 0.9999))
    parts = []
    for kind in ("scratch", "spot", "hole"):
        img = make_surface(rng, size)
        _plant(rng, img, kind)
        parts.append(img)
    # A broken scratch on the spot part (8 px dashes, 9 px gaps), speckle on the hole part.
    y0 = 10
    for x0 in range(14, 114, 17):
        seg = parts[1][y0 : y0 + 2, x0 : x0 + 8]
        parts[1][y0 : y0 + 2, x0 : x0 + 8] = np.clip(seg + 0.35, 0, 1)
    for _ in range(12):
        yy, xx = rng.integers(4, size - 4, 2)
        parts[2][yy, xx] = 1.0
    imgs = to_tensor(parts)
    with torch.inference_mode():
        maps = detector(imgs)
    return np.stack([_to_rgb_u8(p) for p in parts]), maps, thr


def render(rgb: np.ndarray, labels: torch.Tensor, regions: Regions, title: str) -> Image.Image:
    b, h, w = rgb.shape[0], rgb.shape[1], rgb.shape[2]
    canvas = Image.new("RGB", (b * w + (b - 1) * 4, h + 26), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    lab = labels[:, 0].numpy()
    for i in range(b):
        tile = rgb[i].copy()
        tile[mask_outline(lab[i] != 0)] = (230, 30, 30)
        canvas.paste(Image.fromarray(tile), (i * (w + 4), 0))
        for j in np.nonzero(regions.batch_index.numpy() == i)[0]:
            x1, y1, x2, y2 = regions.bbox_xyxy[j].tolist()
            ox = i * (w + 4)
            draw.rectangle([ox + x1 - 1, y1 - 1, ox + x2 + 1, y2 + 1], outline=(250, 210, 0))
        n = int((regions.batch_index == i).sum())
        draw.text((i * (w + 4) + 2, h + 1), f"{n} region{'s' if n != 1 else ''}", fill=(0, 0, 0))
    draw.text((2, h + 13), f"preset: {title}", fill=(90, 90, 90))
    return canvas.quantize(colors=48, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join("docs", "img"))
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    rgb, maps, thr = demo_parts()
    thr_t = torch.full((maps.shape[0],), thr, dtype=torch.float64)
    runs = [("plain", dict(BASE))] + [(n, {**BASE, **preset_config(n)}) for n in list_presets()]
    for name, keys in runs:
        labels, regions = toolbox_pipeline(maps, thr_t, keys)
        path = os.path.join(args.out, f"preset_{name}.png")
        render(rgb, labels, regions, name).save(path, optimize=True)
        counts = [int((regions.batch_index == i).sum()) for i in range(maps.shape[0])]
        kb = os.path.getsize(path) // 1024
        print(f"{path}: {kb} KB, regions per part {counts}, threshold {thr:.4g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
