"""Shared helpers of the benchmark scripts: timing, inputs, machine metadata, output."""

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], device: str = "cpu", min_time: float = 0.5) -> float:
    """Median wall time of ``fn`` in ms: warm-up, then repeats for at least ``min_time`` s."""
    for _ in range(2):
        fn()
    sync(device)
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < min_time and len(times) < 200):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def smooth_blob_masks(b: int, h: int, w: int, frac: float, seed: int = 0) -> torch.Tensor:
    """Sparse defect-like masks: smooth random blobs covering ``frac`` of each image."""
    maps = smooth_maps(b, h, w, seed)
    t = torch.quantile(maps.reshape(b, -1)[:, ::13], 1 - frac, dim=1)
    return maps >= t.view(b, 1, 1)


def smooth_maps(b: int, h: int, w: int, seed: int = 0, cell: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, 1, max(h // cell, 2), max(w // cell, 2), generator=g)
    up = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)
    return up[:, 0].contiguous()


def machine(device: str) -> Dict[str, object]:
    info: Dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    try:
        import cv2

        info["opencv"] = cv2.__version__
        info["opencv_threads"] = cv2.getNumThreads()
    except ImportError:
        pass
    try:
        import kornia

        info["kornia"] = kornia.__version__
    except ImportError:
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def set_threads(threads: Optional[int]) -> None:
    """Pin torch and OpenCV to the same thread count, so ratios compare like with like."""
    if threads is None:
        return
    torch.set_num_threads(threads)
    try:
        import cv2

        cv2.setNumThreads(threads)
    except ImportError:
        pass


def write_json(path: Optional[str], payload: Dict[str, object]) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {path}")


def table(rows: List[Dict[str, object]], columns: List[str]) -> str:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    line = " | ".join(c.ljust(w) for c, w in zip(columns, widths))
    out = [line, "-|-".join("-" * w for w in widths)]
    for r in rows:
        out.append(" | ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))
    return "\n".join(out)


def run_child(script: str, args: List[str]) -> Dict[str, object]:
    """Run ``script`` with ``args`` in a fresh Python (its own peak RSS) and return the JSON
    object on the last line of its stdout; exit with its stderr if it fails. glibc serves
    big buffers by mmap there, so freed ones go back to the OS and peak RSS tracks what is
    live, not the allocator's high-water mark."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    cmd = [sys.executable, os.path.abspath(script), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{os.path.basename(script)} {' '.join(args)} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])
