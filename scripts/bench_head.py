"""Benchmark DefectHead against the fastest per-image OpenCV pipeline doing the same work.

Same run, medians (``torch.utils.benchmark.Timer.blocked_autorange``):

- DefectHead(open 3, close 3, fill holes, min_area 10) on B x 1 x 256 x 256 realistic maps
  (smooth noise plus blobs and rings), eager and scripted;
- the OpenCV pipeline per image: ``cv2.compare`` (>=), ``morphologyEx`` open and close,
  ``floodFill`` hole filling, ``connectedComponentsWithStats``, min_area, per-label max
  (``scipy.ndimage.maximum``) and mean (``np.bincount``) over the map, final mask;
- the morphology fast path against kornia (3x3 opening of the same batch).

Also the peak memory of one DefectHead call per input pixel (CPU: RSS growth in a fresh
subprocess with glibc's mmap threshold pinned, so freed buffers go back to the OS; CUDA:
``torch.cuda.max_memory_allocated``). With ``--device cuda``: images/s at batch 64 against the
OpenCV pipeline on one core. Timings on a shared machine are noisy: medians, and the load
average is recorded.

The toolbox comparison (issue 11): the plain head and a head with the toolbox stages
(``TOOLBOX``: gaussian 5, hysteresis, dilation 3, min_score_mean, merging, sort by area),
scripted, one thread, each against its OpenCV/NumPy per-image equivalent
(:func:`opencv_toolbox`), same run; both ratios and the issue's floor (toolbox ratio at most
1.5x the plain one) are printed. ``--toolbox-only`` runs just that.

Always: the aten ops and host syncs of one scripted forward (the count of issue 9: open 3,
close 3, fill holes, min_area 10, max_regions 20 on 16x1x256x256, CPU, inference mode, after a
warm-up call). With ``--onnx``: ONNX Runtime (CPU) on the exported static head against eager
torch on the same maps. With ``--device cuda``: latency at batch 1 and throughput at batch 64
and 256 (``--gpu-batches``) of 256x256 maps for ``--modes`` eager, scripted and compiled
(``torch.compile(mode="reduce-overhead")``; compiling takes a while, so ``--quick`` leaves it
out unless ``--modes`` names it).

Usage::

    python scripts/bench_head.py [--quick] [--device cpu|cuda] [--batch 16] [--json out.json]
        [--onnx] [--modes eager,scripted,compiled] [--skip-cpu] [--toolbox-only]
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Dict, List

import cv2
import numpy as np
import scipy.ndimage as ndi
import torch
from torch.utils.benchmark import Timer

from torchdefects.config import DefectsConfig
from torchdefects.head import DefectHead
from torchdefects.morphology import opening

THRESHOLD = 0.6
CONFIG = dict(pixel_threshold=THRESHOLD, open_ksize=3, close_ksize=3, fill_holes=True, min_area=10)


def realistic_maps(b: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth noise in [0, 0.5] plus Gaussian blobs and rings that leave holes."""
    rng = np.random.default_rng(seed)
    out = np.empty((b, h, w), np.float32)
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    for i in range(b):
        base = ndi.gaussian_filter(rng.random((h, w), dtype=np.float32), sigma=4)
        base = (base - base.min()) / max(float(np.ptp(base)), 1e-9) * 0.5
        for _ in range(rng.integers(4, 10)):
            cy, cx = rng.random() * h, rng.random() * w
            s = 1.5 + rng.random() * 8
            base += rng.uniform(0.3, 0.6) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.random() * h, rng.random() * w
            d = np.hypot(yy - cy, xx - cx)
            base += rng.uniform(0.4, 0.6) * np.exp(-((d - (4 + rng.random() * 20)) ** 2) / 3.0)
        out[i] = base
    return out


_K3 = np.ones((3, 3), np.uint8)


def opencv_pipeline(m: np.ndarray, thr: float, min_area: int) -> Dict[str, np.ndarray]:
    """One image: the same work as the head, as fast as OpenCV + NumPy allow."""
    h, w = m.shape
    b = cv2.compare(m, thr, cv2.CMP_GE)  # 255 where m >= thr, NaN -> 0
    b = cv2.morphologyEx(b, cv2.MORPH_OPEN, _K3)
    b = cv2.morphologyEx(b, cv2.MORPH_CLOSE, _K3)
    # Flood the background from the border (4-connected); what it cannot reach is a hole.
    flood = np.zeros((h + 2, w + 2), np.uint8)
    flood[1:-1, 1:-1] = b
    cv2.floodFill(flood, None, (0, 0), 255)
    filled = b | cv2.bitwise_not(flood[1:-1, 1:-1])
    _, labels, stats, centroids = cv2.connectedComponentsWithStats(filled, connectivity=8)
    area = stats[:, cv2.CC_STAT_AREA]
    # Per-label max and mean over the foreground pixels only: sort them by label, reduceat.
    flat = labels.ravel()
    fg = np.flatnonzero(flat)
    lab = flat[fg]
    order = np.argsort(lab, kind="stable")
    lab = lab[order]
    vals = m.ravel()[fg][order]
    starts = np.flatnonzero(np.r_[True, lab[1:] != lab[:-1]]) if lab.size else fg[:0]
    all_max = np.maximum.reduceat(vals, starts) if lab.size else vals[:0]
    all_mean = np.add.reduceat(vals.astype(np.float64), starts) / area[1:] if lab.size else vals[:0]
    keep = area >= min_area
    keep[0] = False
    index = np.nonzero(keep)[0]
    score_max = all_max[index - 1]
    score_mean = all_mean[index - 1]
    order = np.lexsort((index, -area[index], -score_max))
    mask = keep[labels]
    return {
        "mask": mask,
        "label": index[order],
        "area": area[index][order],
        "bbox": stats[index][order, :4],
        "centroid": centroids[index][order],
        "score_max": score_max[order],
        "score_mean": score_mean[order],
    }


def opencv_batch(maps: np.ndarray, thr: float, min_area: int) -> List[Dict[str, np.ndarray]]:
    return [opencv_pipeline(m, thr, min_area) for m in maps]


#: The toolbox config of issue 11: gaussian 5, hysteresis, dilation 3, min_score_mean,
#: merging and sorting by area, over the plain config.
TOOLBOX = dict(
    CONFIG,
    map_smoothing_method="gaussian",
    map_smoothing_ksize=5,
    hysteresis_enabled=True,
    hysteresis_low=0.45,
    mask_dilate_ksize=3,
    min_score_mean=0.62,
    merge_nearby_enabled=True,
    merge_nearby_max_gap_px=2,
    max_regions_sort_by="area",
)
_E3 = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))


def opencv_toolbox(m: np.ndarray, thr: float, cfg: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """One image, the TOOLBOX config with OpenCV + NumPy (pyimgano's stages, fast forms)."""
    h, w = m.shape
    k = cfg["map_smoothing_ksize"]
    s = cv2.GaussianBlur(m, (k, k), 0)
    # Hysteresis: components of s >= low (8-connected) holding a pixel >= high.
    weak = cv2.compare(s, cfg["hysteresis_low"], cv2.CMP_GE)
    _, lab = cv2.connectedComponents(weak, connectivity=8)
    seeded = np.zeros(lab.max() + 1, bool)
    seeded[lab[s >= thr]] = True
    seeded[0] = False
    b = seeded[lab].astype(np.uint8) * np.uint8(255)
    b = cv2.morphologyEx(b, cv2.MORPH_OPEN, _K3)
    b = cv2.morphologyEx(b, cv2.MORPH_CLOSE, _K3)
    flood = np.zeros((h + 2, w + 2), np.uint8)
    flood[1:-1, 1:-1] = b
    cv2.floodFill(flood, None, (0, 0), 255)
    b = b | cv2.bitwise_not(flood[1:-1, 1:-1])
    b = cv2.dilate(b, _E3)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(b, connectivity=8)
    area = stats[:, cv2.CC_STAT_AREA].astype(np.int64)
    flat = labels.ravel()
    vals = s.ravel()
    smax = np.full(n, -np.inf, np.float32)
    np.maximum.at(smax, flat, vals)
    ssum = np.bincount(flat, weights=vals.astype(np.float64), minlength=n)
    mean = (ssum / np.maximum(area, 1)).astype(np.float32)
    keep = (area >= cfg["min_area"]) & ~(mean < cfg["min_score_mean"])
    keep[0] = False
    idx = np.nonzero(keep)[0]
    x1, y1 = stats[idx, 0], stats[idx, 1]
    x2, y2 = x1 + stats[idx, 2] - 1, y1 + stats[idx, 3] - 1
    # Merge: pairwise bbox gaps, groups by min-label propagation (pyimgano's rule).
    gap = cfg["merge_nearby_max_gap_px"]
    gx = np.maximum(np.maximum(x1[None] - x2[:, None] - 1, x1[:, None] - x2[None] - 1), 0)
    gy = np.maximum(np.maximum(y1[None] - y2[:, None] - 1, y1[:, None] - y2[None] - 1), 0)
    near = (gx <= gap) & (gy <= gap)
    root = np.arange(idx.size)
    while idx.size:
        new = np.where(near, root[None], idx.size).min(1)
        new = np.minimum(root, new)[np.minimum(root, new)]
        if np.array_equal(new, root):
            break
        root = new
    group = np.zeros(n, np.int64)
    group[idx] = idx[root]
    roots = idx[root == np.arange(idx.size)]
    g_area = np.bincount(group[idx], weights=area[idx], minlength=n)[roots].astype(np.int64)
    g_sum = np.bincount(group[idx], weights=ssum[idx], minlength=n)[roots]
    g_max = np.full(n, -np.inf, np.float32)
    np.maximum.at(g_max, group[idx], smax[idx])
    g_max = g_max[roots]
    g_mean = (g_sum / g_area).astype(np.float32)
    order = np.lexsort((roots, -g_area, -g_max, -g_area))
    out_label = group[flat].reshape(h, w) * keep[labels]
    return {
        "labels": out_label,
        "label": roots[order],
        "area": g_area[order],
        "score_max": g_max[order],
        "score_mean": g_mean[order],
    }


def toolbox_vs_opencv(maps_np: np.ndarray, min_run: float) -> Dict[str, Any]:
    """Plain and toolbox heads (scripted, one thread) against their OpenCV equivalents."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        maps = torch.from_numpy(maps_np).unsqueeze(1)
        plain = torch.jit.script(DefectHead(DefectsConfig(**CONFIG)))
        toolbox = torch.jit.script(DefectHead(DefectsConfig(**TOOLBOX)))
        out = toolbox(maps)
        ref = [opencv_toolbox(m, THRESHOLD, TOOLBOX) for m in maps_np]
        # Same pixels and regions (labels may differ: OpenCV numbers components its own way).
        assert np.array_equal(out.mask[:, 0].numpy(), np.stack([r["labels"] > 0 for r in ref]))
        assert np.array_equal(out.regions.area.numpy(), np.concatenate([r["area"] for r in ref]))
        assert np.array_equal(
            out.regions.score_max.numpy(), np.concatenate([r["score_max"] for r in ref])
        )
        res: Dict[str, Any] = {"regions_per_image": float(out.num_regions.float().mean())}
        res["opencv_plain_ms"] = median_ms(
            lambda: opencv_batch(maps_np, THRESHOLD, CONFIG["min_area"]), min_run
        )
        res["head_plain_ms"] = median_ms(lambda: plain(maps), min_run)
        res["opencv_toolbox_ms"] = median_ms(
            lambda: [opencv_toolbox(m, THRESHOLD, TOOLBOX) for m in maps_np], min_run
        )
        res["head_toolbox_ms"] = median_ms(lambda: toolbox(maps), min_run)
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(-1)
    res["ratio_plain"] = res["head_plain_ms"] / res["opencv_plain_ms"]
    res["ratio_toolbox"] = res["head_toolbox_ms"] / res["opencv_toolbox_ms"]
    res["toolbox_over_plain_ratio"] = res["ratio_toolbox"] / res["ratio_plain"]
    res["floor_met"] = bool(res["ratio_toolbox"] <= 1.5 * res["ratio_plain"])
    return res


def median_ms(stmt, min_run_time: float) -> float:
    stmt()  # warm-up
    t = Timer(stmt="f()", globals={"f": stmt}, num_threads=torch.get_num_threads())
    return t.blocked_autorange(min_run_time=min_run_time).median * 1e3


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def memory_probe(batch: int, size: int, device: str) -> float:
    """Peak bytes of one head call per input pixel."""
    maps = torch.from_numpy(realistic_maps(batch, size, size)).unsqueeze(1).to(device)
    head = DefectHead(DefectsConfig(**CONFIG)).to(device)
    pixels = maps.numel()
    if device == "cuda":
        head(maps)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        head(maps)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / pixels
    # Fresh process, glibc's mmap threshold pinned so freed buffers return to the OS; the
    # peak-RSS mark is reset (clear_refs 5) after the inputs exist and one warm-up call.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    here = os.path.dirname(os.path.abspath(__file__))
    threads = torch.get_num_threads()
    code = "\n".join(
        [
            f"import gc, sys, torch; sys.path.insert(0, {here!r}); import bench_head as bh",
            f"torch.set_num_threads({threads})",
            f"maps = torch.from_numpy(bh.realistic_maps({batch}, {size}, {size})).unsqueeze(1)",
            "head = bh.DefectHead(bh.DefectsConfig(**bh.CONFIG))",
            "head(maps); gc.collect()",
            "open('/proc/self/clear_refs', 'w').write('5')",
            "r0 = bh._status_kb('VmRSS')",
            "head(maps)",
            "print((bh._status_kb('VmHWM') - r0) * 1024 / maps.numel())",
        ]
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


SYNC_OPS = {
    "nonzero",
    "_local_scalar_dense",
    "equal",
    "is_nonzero",
    "masked_select",
    "unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "item",
    "nonzero_numpy",
}


def count_ops() -> Dict[str, Any]:
    """Aten ops and host syncs of one scripted forward, as issue 9 counts them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: Dict[str, int] = {}
            self.syncs: Dict[str, int] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            self.ops[name] = self.ops.get(name, 0) + 1
            kwargs = kwargs or {}
            unsized = name == "repeat_interleave" and kwargs.get("output_size") is None
            unsized = unsized and not (len(args) > 3 and args[3] is not None)
            if name in SYNC_OPS or unsized:
                self.syncs[name] = self.syncs.get(name, 0) + 1
            return func(*args, **kwargs)

    torch.manual_seed(0)
    x = torch.nn.functional.avg_pool2d(torch.rand(16, 1, 256, 256), 9, 1, 4)
    x = (x - x.amin()) / (x.amax() - x.amin())
    cfg = DefectsConfig(
        pixel_threshold=0.7,
        open_ksize=3,
        close_ksize=3,
        fill_holes=True,
        min_area=10,
        max_regions=20,
    )
    head = torch.jit.script(DefectHead(cfg))
    with torch.inference_mode():
        head(x)
        with Count() as c:
            head(x)
    return {
        "ops": sum(c.ops.values()),
        "syncs": sum(c.syncs.values()),
        "syncs_by_op": c.syncs,
    }


def onnx_vs_eager(maps: torch.Tensor, min_run: float) -> Dict[str, Any]:
    """ONNX Runtime (CPU) on the exported static head against eager torch, same maps."""
    import tempfile

    import onnxruntime as ort

    from torchdefects.export import export_onnx

    cfg = DefectsConfig(**CONFIG, max_regions=20)
    head = DefectHead(cfg, static_output=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "head.onnx")
        export_onnx(head, path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feed = {"anomaly_map": maps.numpy()}
    got = session.run(None, feed)
    want = head(maps)
    for name, a, b in zip(want._fields, got, want):
        b = b.to(torch.uint8) if name == "mask" else b
        if not b.is_floating_point():
            assert np.array_equal(a, b.numpy()), name
    res = {
        "onnxruntime_ms": median_ms(lambda: session.run(None, feed), min_run),
        "eager_ms": median_ms(lambda: head(maps), min_run),
    }
    res["ratio_onnxruntime_over_eager"] = res["onnxruntime_ms"] / res["eager_ms"]
    return res


def _cuda_module(cfg: DefectsConfig, mode: str, compile_mode: str) -> Any:
    head = DefectHead(cfg, static_output=mode.endswith("static")).cuda()
    if mode == "scripted":
        return torch.jit.script(head)
    if mode.startswith("compiled"):
        # compiled_static: the fixed-shape forward that torch.export takes, one graph, which
        # reduce-overhead can replay as a CUDA graph.
        return torch.compile(head, mode=compile_mode, dynamic=False)
    return head


def gpu_modes(size: int, batches: List[int], modes: List[str], min_run: float) -> Dict[str, Any]:
    """Latency (batch 1) and throughput (larger batches) on CUDA for each mode.

    A compiled mode tries ``reduce-overhead`` (CUDA graphs) first and falls back to
    Inductor's default mode when that fails; a mode that fails is reported and skipped.
    """
    cfg = DefectsConfig(**CONFIG, max_regions=20)
    out: Dict[str, Any] = {}
    for mode in modes:
        tries = ["reduce-overhead", "default"] if mode.startswith("compiled") else ["-"]
        for compile_mode in tries:
            label = mode if compile_mode in ("-", "reduce-overhead") else f"{mode}[default]"
            try:
                torch._dynamo.reset()
                module = _cuda_module(cfg, mode, compile_mode)
                for b in batches:
                    maps = torch.from_numpy(realistic_maps(b, size, size, seed=2))
                    maps = maps.unsqueeze(1).cuda()

                    def run(module=module, maps=maps):
                        module(maps)
                        torch.cuda.synchronize()

                    t0 = time.perf_counter()
                    run()  # warm-up; compiles in the compiled modes
                    first_s = time.perf_counter() - t0
                    ms = median_ms(run, min_run)
                    out[f"{label}_b{b}"] = {
                        "ms": ms,
                        "maps_per_s": b / ms * 1e3,
                        "first_call_s": first_s,
                    }
                    print(f"  {label:24s} batch {b:4d}: {ms:8.3f} ms  {b / ms * 1e3:10.0f} maps/s")
                break
            except Exception as e:  # report and go on with the next mode
                msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                out[f"{label}_error"] = msg
                print(f"  {label:24s} failed: {msg}")
    return out


def machine() -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "opencv": cv2.__version__,
        "opencv_threads": cv2.getNumThreads(),
        "loadavg": os.getloadavg(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--quick", action="store_true", help="short run (less accurate)")
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    parser.add_argument("--onnx", action="store_true", help="ONNX Runtime CPU vs eager torch")
    parser.add_argument("--skip-cpu", action="store_true", help="leave out the CPU comparison")
    parser.add_argument(
        "--modes",
        default=None,
        help="CUDA modes, comma-separated: eager, scripted, compiled, static (the padded "
        "export forward), compiled_static (default: the first three; "
        "eager,scripted with --quick)",
    )
    parser.add_argument(
        "--gpu-batches", default="1,64,256", help="CUDA batch sizes (default 1,64,256)"
    )
    parser.add_argument(
        "--no-toolbox", action="store_true", help="leave out the toolbox comparison (issue 11)"
    )
    parser.add_argument(
        "--toolbox-only", action="store_true", help="only the toolbox comparison on the CPU"
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    min_run = 0.3 if args.quick else 2.0
    results: Dict[str, Any] = {"machine": machine(), "config": CONFIG, "args": vars(args)}

    counts = count_ops()
    results["scripted_forward"] = counts
    print(
        f"scripted forward (16x1x256x256, CPU): {counts['ops']} aten ops, "
        f"{counts['syncs']} host syncs {counts['syncs_by_op']}"
    )
    if args.device == "cuda":
        modes = args.modes or ("eager,scripted" if args.quick else "eager,scripted,compiled")
        batches = [int(b) for b in args.gpu_batches.split(",")]
        print(f"CUDA ({torch.cuda.get_device_name()}), {args.size}x{args.size} maps:")
        results["cuda_modes"] = gpu_modes(args.size, batches, modes.split(","), min_run)
    if args.onnx:
        maps = torch.from_numpy(realistic_maps(args.batch, args.size, args.size)).unsqueeze(1)
        try:
            o = onnx_vs_eager(maps, min_run)
        except Exception as e:  # export may be blocked; say why and go on
            o = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            print(f"ONNX Runtime: not measured ({o['error']})")
        else:
            ratio = o["ratio_onnxruntime_over_eager"]
            print(
                f"ONNX Runtime CPU {o['onnxruntime_ms']:.2f} ms vs eager {o['eager_ms']:.2f} ms "
                f"({args.batch}x1x{args.size}x{args.size}): ratio {ratio:.2f}"
            )
        results["onnx"] = o
    if args.skip_cpu:
        return _finish(results, args)
    if not args.no_toolbox:
        t = toolbox_vs_opencv(realistic_maps(args.batch, args.size, args.size, seed=2), min_run)
        results["toolbox"] = t
        b, s = args.batch, args.size
        print(f"toolbox (issue 11), {b}x1x{s}x{s}, scripted, one thread, medians:")
        for kind in ("plain", "toolbox"):
            head_ms, cv_ms = t[f"head_{kind}_ms"], t[f"opencv_{kind}_ms"]
            print(f"  {kind:8s}head {head_ms:8.2f} ms, OpenCV {cv_ms:8.2f} ms")
        print(
            f"  ratio head/OpenCV: plain {t['ratio_plain']:.2f}, toolbox {t['ratio_toolbox']:.2f} "
            f"(toolbox/plain {t['toolbox_over_plain_ratio']:.2f}; floor 1.5: "
            f"{'met' if t['floor_met'] else 'NOT met'})"
        )
        if args.toolbox_only:
            return _finish(results, args)

    maps_np = realistic_maps(args.batch, args.size, args.size)
    maps = torch.from_numpy(maps_np).unsqueeze(1)
    head = DefectHead(DefectsConfig(**CONFIG))
    scripted = torch.jit.script(head)

    # The two pipelines must agree before their times mean anything.
    out = head(maps)
    ref = opencv_batch(maps_np, THRESHOLD, CONFIG["min_area"])
    assert np.array_equal(out.mask[:, 0].numpy(), np.stack([r["mask"] for r in ref]))
    assert np.array_equal(out.regions.area.numpy(), np.concatenate([r["area"] for r in ref]))
    assert np.array_equal(
        out.regions.score_max.numpy(), np.concatenate([r["score_max"] for r in ref])
    )
    results["regions_per_image"] = float(out.num_regions.float().mean())

    res = {}
    res["opencv_ms"] = median_ms(
        lambda: opencv_batch(maps_np, THRESHOLD, CONFIG["min_area"]), min_run
    )
    res["head_eager_ms"] = median_ms(lambda: head(maps), min_run)
    res["head_scripted_ms"] = median_ms(lambda: scripted(maps), min_run)
    res["ratio_eager"] = res["head_eager_ms"] / res["opencv_ms"]
    res["ratio_scripted"] = res["head_scripted_ms"] / res["opencv_ms"]
    mask = maps >= THRESHOLD
    import kornia

    kernel = torch.ones(3, 3)
    res["open3_kornia_ms"] = median_ms(
        lambda: kornia.morphology.opening(mask.float(), kernel), min_run
    )
    res["open3_fast_ms"] = median_ms(lambda: opening(mask, 3), min_run)
    res["peak_bytes_per_pixel"] = memory_probe(args.batch, args.size, "cpu")
    results["cpu"] = res
    b, s = args.batch, args.size
    print(f"CPU, {b}x1x{s}x{s}, torch threads {torch.get_num_threads()}, medians:")
    print(f"  OpenCV per-image pipeline   {res['opencv_ms']:8.2f} ms")
    print(f"  DefectHead eager            {res['head_eager_ms']:8.2f} ms")
    print(f"  DefectHead scripted         {res['head_scripted_ms']:8.2f} ms")
    ratio, sratio = res["ratio_eager"], res["ratio_scripted"]
    print(f"  ratio head/OpenCV           {ratio:8.2f} (scripted {sratio:.2f})")
    kms, fms = res["open3_kornia_ms"], res["open3_fast_ms"]
    print(f"  opening 3x3: kornia {kms:.2f} ms, fast path {fms:.3f} ms")
    print(f"  peak memory per input pixel {res['peak_bytes_per_pixel']:8.1f} bytes (RSS growth)")

    if args.device == "cuda" and not args.quick:
        cv2.setNumThreads(1)
        gb = 64
        gmaps_np = realistic_maps(gb, args.size, args.size, seed=1)
        gmaps = torch.from_numpy(gmaps_np).unsqueeze(1).cuda()
        ghead = DefectHead(DefectsConfig(**CONFIG)).cuda()
        gscripted = torch.jit.script(ghead)

        def run_cuda(module=ghead):
            module(gmaps)
            torch.cuda.synchronize()

        g = {}
        g["head_ms"] = median_ms(run_cuda, min_run)
        g["head_scripted_ms"] = median_ms(lambda: run_cuda(gscripted), min_run)
        g["opencv_1core_ms"] = median_ms(
            lambda: opencv_batch(gmaps_np, THRESHOLD, CONFIG["min_area"]), min_run
        )
        g["head_images_per_s"] = gb / g["head_ms"] * 1e3
        g["opencv_1core_images_per_s"] = gb / g["opencv_1core_ms"] * 1e3
        g["peak_bytes_per_pixel"] = memory_probe(gb, args.size, "cuda")
        results["cuda"] = g
        print(f"CUDA ({torch.cuda.get_device_name()}), batch {gb}:")
        print(f"  DefectHead        {g['head_images_per_s']:10.0f} images/s")
        print(f"  scripted          {gb / g['head_scripted_ms'] * 1e3:10.0f} images/s")
        print(f"  OpenCV, one core  {g['opencv_1core_images_per_s']:10.0f} images/s")
        print(f"  peak memory per input pixel {g['peak_bytes_per_pixel']:.1f} bytes")

    return _finish(results, args)


def _finish(results: Dict[str, Any], args: argparse.Namespace) -> int:
    print(f"load average {results['machine']['loadavg']} (shared machine: timings are noisy)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
