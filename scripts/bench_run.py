"""Benchmark ``torchdefects run`` against a per-image OpenCV loop on the same .npy files.

Both sides read N maps of SIZE x SIZE from .npy files, find defects with the same
settings (threshold, open 3, close 3, fill holes, min_area 10, 8-connectivity, per-region
max/mean) and write one PNG mask (0/255) and one JSON line per map. Items/s, median of
``--repeats`` timed runs after one warm-up run each.

Usage:
    python scripts/bench_run.py              # 2,000 maps of 256x256 on the CPU
    python scripts/bench_run.py --quick      # 200 maps
    python scripts/bench_run.py --device cuda --json bench_run.json
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

THRESHOLD = 0.6
MIN_AREA = 10


def _maps(n_unique, size, seed=0):
    """Smooth noise in [0, 0.5] plus bright blobs and rings (holes), like real maps."""
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.fftfreq(size)[None, :]
    g = np.exp(-2 * (np.pi * 3.0) ** 2 * (fx**2 + fy**2))
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for _ in range(n_unique):
        s = np.real(np.fft.ifft2(np.fft.fft2(rng.standard_normal((size, size))) * g))
        a = 0.25 + 0.08 * s / s.std()
        for k in range(int(rng.integers(1, 6))):
            cy, cx = rng.integers(10, size - 10, size=2)
            r = rng.uniform(3, 12)
            d = np.hypot(yy - cy, xx - cx)
            blob = d <= r if k % 2 else (d <= r) & (d >= r / 2)
            a = np.where(blob, 0.7 + 0.3 * rng.random((size, size)), a)
        out.append(np.clip(a, 0, 1).astype(np.float32))
    return out


def _opencv_loop(paths, out_dir):
    import cv2
    import scipy.ndimage as ndi

    os.makedirs(out_dir, exist_ok=True)
    k = np.ones((3, 3), np.uint8)
    with open(os.path.join(out_dir, "results.jsonl"), "w") as f:
        for p in paths:
            a = np.load(p)
            fg = (a >= THRESHOLD).astype(np.uint8)
            fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, k)
            fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, k)
            # Fill holes: flood the background from outside, what is not reached is a hole.
            h, w = fg.shape
            pad = np.zeros((h + 2, w + 2), np.uint8)
            pad[1:-1, 1:-1] = fg
            ff_mask = np.zeros((h + 4, w + 4), np.uint8)
            cv2.floodFill(pad, ff_mask, (0, 0), 2)
            fg = (pad[1:-1, 1:-1] != 2).astype(np.uint8)
            n, labels, stats, cents = cv2.connectedComponentsWithStats(fg, connectivity=8)
            keep = np.nonzero(stats[1:, cv2.CC_STAT_AREA] >= MIN_AREA)[0] + 1
            idx = keep.tolist()
            mx = ndi.maximum(a, labels, idx) if idx else []
            sums = np.bincount(labels.ravel(), weights=a.ravel(), minlength=n)
            regions = []
            for j, lab in enumerate(idx):
                x, y, bw, bh, area = stats[lab]
                regions.append(
                    {
                        "id": lab,
                        "bbox_xyxy": [int(x), int(y), int(x + bw - 1), int(y + bh - 1)],
                        "area": int(area),
                        "centroid_xy": [float(cents[lab][0]), float(cents[lab][1])],
                        "score_max": float(mx[j]),
                        "score_mean": float(sums[lab] / area),
                    }
                )
            lut = np.zeros(n, bool)
            lut[keep] = True
            final = lut[labels]
            name = os.path.basename(p) + ".png"
            cv2.imwrite(os.path.join(out_dir, name), final.astype(np.uint8) * 255)
            f.write(json.dumps({"input": p, "regions": regions}) + "\n")
            f.flush()


def _torchdefects(maps_dir, out_dir, device, batch_size, num_workers):
    from torchdefects.batch import RunOptions, run_folder

    s = run_folder(
        RunOptions(
            out=out_dir,
            maps=maps_dir,
            pixel_threshold=THRESHOLD,
            overrides={"open_ksize": 3, "close_ksize": 3, "fill_holes": True, "min_area": MIN_AREA},
            save_masks="png",
            device=device,
            batch_size=batch_size,
            num_workers=num_workers,
            overwrite=True,
            quiet=True,
        )
    )
    if s.exit_code != 0:
        raise RuntimeError(f"torchdefects run failed: {s.line()}")


def _time(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="maps (default 2000)")
    ap.add_argument("--quick", action="store_true", help="200 maps")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-opencv", action="store_true", help="skip the OpenCV anchor")
    ap.add_argument("--json", metavar="PATH", help="write the results here")
    args = ap.parse_args(argv)
    n = 200 if args.quick else args.n

    tmp = tempfile.mkdtemp(prefix="bench_run_")
    try:
        maps_dir = os.path.join(tmp, "maps")
        os.makedirs(maps_dir)
        unique = _maps(min(n, 64), args.size)
        paths = []
        for i in range(n):
            p = os.path.join(maps_dir, f"map_{i:05d}.npy")
            np.save(p, unique[i % len(unique)])
            paths.append(p)

        results = {}
        t_td, all_td = _time(
            lambda: _torchdefects(
                maps_dir, os.path.join(tmp, "td"), args.device, args.batch_size, args.num_workers
            ),
            args.repeats,
        )
        results["torchdefects_run"] = {
            "items_per_s": n / t_td,
            "median_s": t_td,
            "runs_s": all_td,
            "device": args.device,
            "batch_size": args.batch_size,
            "num_workers": args.num_workers,
        }
        if not args.no_opencv:
            import cv2

            t_cv, all_cv = _time(lambda: _opencv_loop(paths, os.path.join(tmp, "cv")), args.repeats)
            results["opencv_loop"] = {
                "items_per_s": n / t_cv,
                "median_s": t_cv,
                "runs_s": all_cv,
                "cv2": cv2.__version__,
                "cv2_threads": cv2.getNumThreads(),
            }
            results["speedup"] = t_cv / t_td
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    meta = {
        "n_maps": n,
        "size": args.size,
        "settings": {
            "threshold": THRESHOLD,
            "open": 3,
            "close": 3,
            "fill_holes": True,
            "min_area": MIN_AREA,
            "connectivity": 8,
            "mask": "png",
        },
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
    }
    report = {"meta": meta, "results": results}
    td = results["torchdefects_run"]
    print(
        f"torchdefects run ({args.device}, batch {args.batch_size}, workers {args.num_workers}): "
        f"{td['items_per_s']:.1f} items/s ({n} maps {args.size}x{args.size}, median "
        f"{td['median_s']:.2f} s of {args.repeats})"
    )
    if "opencv_loop" in results:
        cv = results["opencv_loop"]
        print(
            f"OpenCV per-image loop: {cv['items_per_s']:.1f} items/s "
            f"(median {cv['median_s']:.2f} s); torchdefects/OpenCV = {results['speedup']:.2f}x"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
