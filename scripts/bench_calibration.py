"""Benchmark the exact streaming calibrator against ``numpy.quantile`` on the same pixels.

Both sides see the same 2^27 pixels (``--pixels-log2``) of uniform random maps, generated
per batch of 32 x 256 x 256 from a fixed seed:

- ``stream``: :class:`~torchdefects.calibration.PixelThresholdCalibrator` fed batch by batch
  (on ``--device``); timed: every ``update`` plus ``compute`` (batch generation excluded);
- ``numpy``: all pixels held in memory as float64, timed: ``numpy.quantile(x, q)``;
- ``torch.quantile`` is also tried on 2^24 + 1 values (it refuses: "input tensor is too large").

Each side runs in a fresh subprocess so its peak memory can be read: CPU, the growth of peak
RSS (``ru_maxrss``) over the process before the first update (stream: kept values, one batch,
temporaries; numpy: its internal copy, over the data it holds; the data itself is reported
separately); CUDA, ``torch.cuda.max_memory_allocated`` over the batch itself. Times are the
median of ``--repeats`` runs after one warm-up; the machine is shared, so expect noise and
compare medians from the same run. The two thresholds must be equal; the script fails if not.

Usage::

    python scripts/bench_calibration.py [--quick] [--device cpu|cuda] [--q 0.999]
        [--pixels-log2 27] [--repeats 3] [--json out.json]
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
from _bench import machine, run_child, sync, table, write_json

B, H, W = 32, 256, 256


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _batch(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.rand(B, 1, H, W, generator=g)


def child_stream(n_batches: int, q: float, device: str, repeats: int) -> Dict[str, Any]:
    from torchdefects.calibration import PixelThresholdCalibrator

    warm = PixelThresholdCalibrator(q=q)
    for i in range(2):
        warm.update(_batch(i).to(device))
    warm.compute()
    del warm
    sync(device)
    first = _batch(0).to(device)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    base_rss = _rss_mib()
    times: List[float] = []
    peak_kept = 0
    threshold = float("nan")
    exact_single_pass = True
    for _ in range(repeats):
        cal = PixelThresholdCalibrator(q=q)
        elapsed = 0.0
        for i in range(n_batches):
            x = first if i == 0 else _batch(i).to(device)
            sync(device)
            t = time.perf_counter()
            cal.update(x)
            sync(device)
            elapsed += time.perf_counter() - t
            peak_kept = max(peak_kept, cal.kept_count)
            del x
        t = time.perf_counter()
        exact_single_pass = exact_single_pass and cal.is_exact()
        threshold, prov = cal.compute()
        sync(device)
        elapsed += time.perf_counter() - t
        times.append(elapsed)
    out: Dict[str, Any] = {
        "seconds_median": statistics.median(times),
        "seconds_all": times,
        "threshold": threshold,
        "pixels": prov["calibration_pixel_count"],
        "exact_single_pass": exact_single_pass,
        "peak_kept_values": peak_kept,
        "peak_rss_growth_mib": _rss_mib() - base_rss,
        "batch_mib": B * H * W * 4 / 2**20,
    }
    if device.startswith("cuda"):
        out["cuda_peak_over_batch_mib"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    return out


def child_numpy(n_batches: int, q: float, repeats: int) -> Dict[str, Any]:
    x = np.empty(n_batches * B * H * W, np.float64)
    step = B * H * W
    for i in range(n_batches):
        x[i * step : (i + 1) * step] = _batch(i).numpy().ravel()
    np.quantile(x[: 1 << 20], q)  # warm-up
    base_rss = _rss_mib()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        threshold = float(np.quantile(x, q))
        times.append(time.perf_counter() - t)
    return {
        "seconds_median": statistics.median(times),
        "seconds_all": times,
        "threshold": threshold,
        "pixels": int(x.size),
        "data_held_mib": x.nbytes / 2**20,
        "peak_rss_growth_mib": _rss_mib() - base_rss,
    }


def torch_quantile_refuses() -> str:
    try:
        torch.quantile(torch.zeros((1 << 24) + 1), 0.5)
    except RuntimeError as e:
        return f"error: {str(e).splitlines()[0]}"
    return "ok"


def _run_child(mode: str, args: argparse.Namespace, n_batches: int) -> Dict[str, Any]:
    extra = ["--q", str(args.q), "--device", args.device, "--repeats", str(args.repeats)]
    return run_child(__file__, ["--child", mode, *extra, "--n-batches", str(n_batches)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--q", type=float, default=0.999)
    p.add_argument("--pixels-log2", type=int, default=27)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="2^25 pixels, one repeat")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--child", choices=("stream", "numpy"), help=argparse.SUPPRESS)
    p.add_argument("--n-batches", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        if args.child == "stream":
            res = child_stream(args.n_batches, args.q, args.device, args.repeats)
        else:
            res = child_numpy(args.n_batches, args.q, args.repeats)
        print(json.dumps(res))
        return

    if args.quick:
        args.pixels_log2, args.repeats = min(args.pixels_log2, 25), 1
    n_batches = max(1, (1 << args.pixels_log2) // (B * H * W))
    stream = _run_child("stream", args, n_batches)
    anchor = _run_child("numpy", args, n_batches)
    refusal = torch_quantile_refuses()
    equal = stream["threshold"] == anchor["threshold"]
    stream_mem = stream.get("cuda_peak_over_batch_mib", stream["peak_rss_growth_mib"])
    numpy_mem = f"{anchor['peak_rss_growth_mib']:.1f} (+{anchor['data_held_mib']:.0f} data)"
    rows = [
        {
            "method": f"PixelThresholdCalibrator ({args.device}, streamed)",
            "pixels": stream["pixels"],
            "median_s": f"{stream['seconds_median']:.3f}",
            "peak_mem_MiB": f"{stream_mem:.1f}",
            "threshold": repr(stream["threshold"]),
        },
        {
            "method": "numpy.quantile (cpu, float64 in memory)",
            "pixels": anchor["pixels"],
            "median_s": f"{anchor['seconds_median']:.3f}",
            "peak_mem_MiB": numpy_mem,
            "threshold": repr(anchor["threshold"]),
        },
    ]
    print(table(rows, ["method", "pixels", "median_s", "peak_mem_MiB", "threshold"]))
    print(
        f"q={args.q} batches={n_batches} x {B}x{H}x{W}; kept values at peak "
        f"{stream['peak_kept_values']}; exact in one pass: {stream['exact_single_pass']}; "
        f"equal thresholds: {equal}; torch.quantile on 2^24+1: {refusal}"
    )
    print(
        f"speed-up over numpy.quantile: {anchor['seconds_median'] / stream['seconds_median']:.2f}x"
        f" (medians of {args.repeats}; shared machine, load {os.getloadavg()[0]:.2f})"
    )
    write_json(
        args.json,
        {
            "benchmark": "calibration",
            "machine": machine(args.device),
            "loadavg": os.getloadavg(),
            "q": args.q,
            "batch_shape": [B, 1, H, W],
            "n_batches": n_batches,
            "repeats": args.repeats,
            "stream": stream,
            "numpy_quantile": anchor,
            "torch_quantile_2_24_plus_1": refusal,
            "equal": equal,
        },
    )
    if not equal:
        raise SystemExit("thresholds differ: the calibrator is not exact")


if __name__ == "__main__":
    main()
