"""Benchmark ``DefectMetrics`` (streamed, exact and binned) against scikit-learn, same data.

The data: ``--maps`` anomaly maps of 256 x 256 (default 2,000), float32, made per batch of
16 from a fixed seed: smooth random maps plus fine noise (so nearly every value is
distinct, the hard case for the exact curve), half of the images with blob defects
(about 2% of their pixels) whose map values are raised.

- ``exact``: :class:`~torchdefects.DefectMetrics` with a head config (threshold, 3x3
  opening, min_area 4) fed batch by batch: every metric (pixel P/R/F1/IoU, pixel AUROC,
  AUPRO@0.3, segf1, region, image); timed: every ``update`` plus ``compute``;
- ``binned``: the same with ``bins=12`` (values rounded down to 12 mantissa bits);
- ``sklearn``: every pixel held in memory (float32 scores, bool labels), timed:
  ``roc_auc_score`` plus ``precision_recall_curve`` (what segf1 needs) -- pixel AUROC and
  best F1 only, no PRO, no region or image metrics.

Each side runs in a fresh subprocess, so its peak memory is its own: the growth of peak RSS
(``ru_maxrss``) over the process before the first update (sklearn: over the data it holds,
which is reported apart). Times are medians of ``--repeats`` runs after a small warm-up.
The exact AUROC must equal sklearn's to 1e-9 and the binned one must be within its
reported bound; the script fails otherwise. The machine may be shared: compare medians
from the same run.

Usage::

    python scripts/bench_evaluate.py [--quick] [--maps 2000] [--repeats 3] [--json out.json]
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time
from typing import Any, Dict, List

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench import machine, run_child, smooth_maps, table, write_json

B, H, W = 16, 256, 256


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _batch(i: int, b: int = B):
    """Maps (b,1,H,W) float32 and ground truth (b,1,H,W) bool of batch ``i``."""
    g = torch.Generator().manual_seed(7000 + i)
    maps = smooth_maps(b, H, W, seed=7000 + i) + 0.05 * torch.rand(b, H, W, generator=g)
    blobs = smooth_maps(b, H, W, seed=9000 + i, cell=32)
    t = torch.quantile(blobs.reshape(b, -1)[:, ::13], 0.98, dim=1)
    gt = blobs >= t.view(b, 1, 1)
    gt[::2] = False  # half of the images are normal
    maps = torch.where(gt, maps + 0.4, maps)
    return maps.unsqueeze(1).contiguous(), gt.unsqueeze(1).contiguous()


def _config():
    from torchdefects.config import DefectsConfig

    return DefectsConfig(pixel_threshold=1.0, open_ksize=3, min_area=4)


def child_ours(n_batches: int, bins: Any, repeats: int) -> Dict[str, Any]:
    from torchdefects.metrics import DefectMetrics

    warm = DefectMetrics(_config(), bins=bins)
    warm.update(*_batch(0, 2))
    warm.compute()
    del warm
    base_rss = _rss_mib()
    times: List[float] = []
    res: Dict[str, Any] = {}
    for _ in range(repeats):
        m = DefectMetrics(_config(), bins=bins)
        elapsed = 0.0
        for i in range(n_batches):
            x, gt = _batch(i)
            t = time.perf_counter()
            m.update(x, gt)
            elapsed += time.perf_counter() - t
        t = time.perf_counter()
        res = m.compute()
        elapsed += time.perf_counter() - t
        times.append(elapsed)
    return {
        "seconds_median": statistics.median(times),
        "seconds_all": times,
        "pixel_auroc": res["pixel_auroc"],
        "pixel_auroc_error_bound": res["pixel_auroc_error_bound"],
        "pixel_aupro": res["pixel_aupro"],
        "segf1": res["pixel_best_f1"]["f1"],
        "region_recall": res["region"]["recall"],
        "pixels": res["pixels"],
        "peak_rss_growth_mib": _rss_mib() - base_rss,
    }


def child_sklearn(n_batches: int, repeats: int) -> Dict[str, Any]:
    from sklearn.metrics import precision_recall_curve, roc_auc_score

    n = n_batches * B * H * W
    scores = np.empty(n, np.float32)
    labels = np.empty(n, bool)
    step = B * H * W
    for i in range(n_batches):
        x, gt = _batch(i)
        scores[i * step : (i + 1) * step] = x.numpy().ravel()
        labels[i * step : (i + 1) * step] = gt.numpy().ravel()
    roc_auc_score(labels[:4096], scores[:4096])  # warm-up (imports)
    base_rss = _rss_mib()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        auroc = float(roc_auc_score(labels, scores))
        p, r, _ = precision_recall_curve(labels, scores)
        with np.errstate(invalid="ignore"):
            f1 = float(np.nanmax(2 * p * r / (p + r)))
        times.append(time.perf_counter() - t)
        del p, r
    return {
        "seconds_median": statistics.median(times),
        "seconds_all": times,
        "pixel_auroc": auroc,
        "segf1": f1,
        "pixels": n,
        "data_held_mib": (scores.nbytes + labels.nbytes) / 2**20,
        "peak_rss_growth_mib": _rss_mib() - base_rss,
    }


def _run_child(mode: str, args: argparse.Namespace, n_batches: int) -> Dict[str, Any]:
    extra = ["--repeats", str(args.repeats), "--n-batches", str(n_batches)]
    return run_child(__file__, ["--child", mode, *extra])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--maps", type=int, default=2000, help="number of 256x256 maps")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--quick", action="store_true", help="160 maps, one repeat")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--child", choices=("exact", "binned", "sklearn"), help=argparse.SUPPRESS)
    p.add_argument("--n-batches", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    if args.child:
        if args.child == "sklearn":
            res = child_sklearn(args.n_batches, args.repeats)
        else:
            res = child_ours(args.n_batches, 12 if args.child == "binned" else None, args.repeats)
        print(json.dumps(res))
        return

    if args.quick:
        args.maps, args.repeats = min(args.maps, 160), 1
    n_batches = max(1, args.maps // B)
    results = {mode: _run_child(mode, args, n_batches) for mode in ("exact", "binned", "sklearn")}
    sk = results["sklearn"]
    rows = []
    for mode, label in (
        ("exact", "DefectMetrics exact (all metrics, streamed)"),
        ("binned", "DefectMetrics bins=12 (all metrics, streamed)"),
        ("sklearn", "sklearn roc_auc_score + precision_recall_curve"),
    ):
        r = results[mode]
        mem = f"{r['peak_rss_growth_mib']:.0f}"
        if "data_held_mib" in r:
            mem += f" (+{r['data_held_mib']:.0f} data)"
        rows.append(
            {
                "method": label,
                "pixels": r["pixels"],
                "median_s": f"{r['seconds_median']:.2f}",
                "peak_mem_MiB": mem,
                "pixel_auroc": f"{r['pixel_auroc']:.12f}",
                "best_f1": f"{r['segf1']:.6f}",
            }
        )
    print(table(rows, ["method", "pixels", "median_s", "peak_mem_MiB", "pixel_auroc", "best_f1"]))
    ex, bi = results["exact"], results["binned"]
    print(
        f"{n_batches * B} maps of {H}x{W}; exact AUPRO@0.3 {ex['pixel_aupro']:.6f}, binned "
        f"{bi['pixel_aupro']:.6f}; binned AUROC error bound {bi['pixel_auroc_error_bound']:.2e}; "
        f"torch threads {args.threads}; load {os.getloadavg()[0]:.2f} (shared machine)"
    )
    ok = (
        abs(ex["pixel_auroc"] - sk["pixel_auroc"]) <= 1e-9
        and abs(ex["segf1"] - sk["segf1"]) <= 1e-9
    )
    ok = ok and abs(bi["pixel_auroc"] - ex["pixel_auroc"]) <= bi["pixel_auroc_error_bound"] + 1e-12
    write_json(args.json, {"machine": machine("cpu"), "maps": n_batches * B, "results": results})
    if not ok:
        raise SystemExit("FAIL: the exact metrics differ from sklearn or binned exceeds its bound")


if __name__ == "__main__":
    main()
