"""Benchmark the toolbox stages against the OpenCV/NumPy per-image code doing the same work.

Same run, one thread by default, medians (``_bench.median_ms``), on B x 1 x 256 x 256 smooth
maps (``--quick``: B = 4, 128 x 128):

- smoothing (gaussian 5, median 3, box 5) vs ``cv2.GaussianBlur``/``medianBlur``/``blur``;
- ellipse dilation 5 vs ``cv2.dilate``;
- hysteresis vs pyimgano's way (``connectedComponentsWithStats`` of the low mask + seeds);
- shape statistics with solidity vs ``findContours`` + ``convexHull`` + ``contourArea``
  per region (pyimgano's loop);
- region filters + merging + quantile + sort vs a per-image Python loop over region dicts
  (pyimgano's ``merge_regions_nearby`` pairwise union-find).

Torch runs eager and, for the scriptable stages, scripted. The ratio is torch / OpenCV
(below 1: torch faster). These stages are to be folded into ``scripts/bench_head.py`` once the
head calls them.

Usage::

    python scripts/bench_toolbox.py [--quick] [--threads 1] [--device cpu] [--json out.json]
"""

import argparse
import os
import sys
from typing import Dict, List

import cv2
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _bench import machine, median_ms, set_threads, smooth_maps, table, write_json

from torchdefects import connected_components, region_stats
from torchdefects.ellipse import dilate_ellipse
from torchdefects.filters import smooth_map
from torchdefects.hysteresis import hysteresis_threshold
from torchdefects.region_filters import (
    finalize_regions,
    merge_nearby,
    quantile_keep,
    region_keep,
)
from torchdefects.shape import shape_stats, solidity


def _cv_loop(maps: np.ndarray, fn) -> None:
    for m in maps:
        fn(m)


def _cv_hysteresis(m: np.ndarray, lo: float, hi: float) -> np.ndarray:
    low = (m >= lo).astype(np.uint8)
    high = m >= hi
    _, labels, _, _ = cv2.connectedComponentsWithStats(low, connectivity=8)
    seeds = np.unique(labels[high])
    seeds = seeds[seeds != 0]
    return np.isin(labels, seeds)


def _cv_solidity(mask: np.ndarray) -> List[float]:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    out = []
    for i in range(1, n):
        x, y, w, h = stats[i, :4]
        comp = (labels[y : y + h, x : x + w] == i).astype(np.uint8)
        cs, _ = cv2.findContours(comp, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        c = max(cs, key=cv2.contourArea)
        hull = cv2.contourArea(cv2.convexHull(c))
        out.append(cv2.contourArea(c) / hull if hull > 0 else float("nan"))
    return out


def _py_select(mask: np.ndarray, m: np.ndarray, gap: int) -> list:
    """pyimgano's region list path: stats, filters, merge (pairwise union-find), quantile, sort."""
    n, labels, stats, _cent = cv2.connectedComponentsWithStats(
        mask.astype(np.uint8), connectivity=8
    )
    regs = []
    for i in range(1, n):
        x, y, w, h, a = stats[i]
        vals = m[labels == i]
        if a < 4 or vals.max() < 0.0 or a / (w * h) < 0.1:
            continue
        regs.append({"id": i, "bbox": [x, y, x + w - 1, y + h - 1], "area": a, "max": vals.max()})
    parent = list(range(len(regs)))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(len(regs)):
        for j in range(i + 1, len(regs)):
            a, b = regs[i]["bbox"], regs[j]["bbox"]
            gx = max(0, b[0] - a[2] - 1, a[0] - b[2] - 1)
            gy = max(0, b[1] - a[3] - 1, a[1] - b[3] - 1)
            if gx <= gap and gy <= gap:
                ri, rj = find(i), find(j)
                parent[max(ri, rj)] = min(ri, rj)
    groups: Dict[int, list] = {}
    for i in range(len(regs)):
        groups.setdefault(find(i), []).append(regs[i])
    merged = [
        {"area": sum(r["area"] for r in g), "max": max(r["max"] for r in g), "id": g[0]["id"]}
        for g in groups.values()
    ]
    if merged:
        t = np.quantile(np.array([r["max"] for r in merged], np.float32), 0.2)
        merged = [r for r in merged if r["max"] >= t]
    return sorted(merged, key=lambda r: (-r["max"], -r["area"], r["id"]))[:20]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    set_threads(args.threads)
    b, size = (4, 128) if args.quick else (16, 256)
    if args.batch:
        b = args.batch
    dev = args.device
    maps = smooth_maps(b, size, size, seed=0).unsqueeze(1).to(dev)
    np_maps = maps[:, 0].cpu().numpy()
    thr = float(torch.quantile(maps.reshape(-1)[::7].cpu(), 0.9))
    mask = maps >= thr
    np_mask = mask[:, 0].cpu().numpy()
    lo_t, hi_t = torch.tensor(thr * 0.9), torch.tensor(thr)
    rows: List[Dict[str, object]] = []
    min_time = 0.2 if args.quick else 0.5

    def add(stage: str, torch_fn, cv_fn, scripted_fn=None) -> None:
        t_torch = median_ms(torch_fn, dev, min_time)
        t_cv = median_ms(cv_fn, "cpu", min_time)
        row: Dict[str, object] = {
            "stage": stage,
            "torch_ms": round(t_torch, 3),
            "opencv_ms": round(t_cv, 3),
        }
        row["ratio"] = round(t_torch / t_cv, 2)
        if scripted_fn is not None:
            t_s = median_ms(scripted_fn, dev, min_time)
            row["scripted_ms"] = round(t_s, 3)
            row["scripted_ratio"] = round(t_s / t_cv, 2)
        rows.append(row)
        print(row, flush=True)

    sm = torch.jit.script(smooth_map)
    dilate_scripted = torch.jit.script(dilate_ellipse)
    hyst_scripted = torch.jit.script(hysteresis_threshold)
    for method, k, cv in [
        ("gaussian", 5, lambda m: cv2.GaussianBlur(m, (5, 5), 0)),
        ("median", 3, lambda m: cv2.medianBlur(m, 3)),
        ("box", 5, lambda m: cv2.blur(m, (5, 5))),
    ]:
        add(
            f"smooth {method} {k}",
            lambda method=method, k=k: smooth_map(maps, method, k),
            lambda cv=cv: _cv_loop(np_maps, cv),
            lambda method=method, k=k: sm(maps, method, k, 0.0),
        )
    se = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    np_u8 = np_mask.astype(np.uint8)
    add(
        "dilate ellipse 5",
        lambda: dilate_ellipse(mask, 5),
        lambda: _cv_loop(np_u8, lambda m: cv2.dilate(m, se)),
        lambda: dilate_scripted(mask, 5),
    )
    add(
        "hysteresis",
        lambda: hysteresis_threshold(maps, lo_t, hi_t, 8),
        lambda: _cv_loop(np_maps, lambda m: _cv_hysteresis(m, thr * 0.9, thr)),
        lambda: hyst_scripted(maps, lo_t, hi_t, 8, None),
    )
    labels, counts = connected_components(mask, 8)
    regions = region_stats(labels, counts, maps)

    def torch_shape():
        shape_stats(regions)
        solidity(labels, regions)

    add("shape + solidity", torch_shape, lambda: _cv_loop(np_mask, _cv_solidity))

    def torch_select():
        labels_, counts_ = connected_components(mask, 8)
        regs = region_stats(labels_, counts_, maps)
        keep = region_keep(regs, 4, 0.0, None, 0.1)
        merged = merge_nearby(labels_, regs, keep, b, 2, maps)
        keep = quantile_keep(merged.regions, merged.keep, b, 0.2)
        finalize_regions(merged.labels, merged.regions, keep, b, "score_max", 20)

    add(
        "label + filters + merge + quantile + sort",
        torch_select,
        lambda: [_py_select(np_mask[i], np_maps[i], 2) for i in range(b)],
    )
    print(f"\n{b} x 1 x {size} x {size} maps, {args.threads} thread(s), device {dev}")
    print(table(rows, ["stage", "torch_ms", "scripted_ms", "opencv_ms", "ratio", "scripted_ratio"]))
    write_json(args.json, {"machine": machine(dev), "batch": b, "size": size, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
