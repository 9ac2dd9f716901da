"""Benchmark: labels + region stats vs OpenCV, kornia and (on CUDA) CuPy and cuCIM, medians.

    python scripts/bench_components.py                 # CPU, this machine
    python scripts/bench_components.py --device cuda   # on a GPU host
    python scripts/bench_components.py --json out.json

Ratios are measured in the same run: ``x cv2`` is our time over the per-image
``cv2.connectedComponentsWithStats`` loop (lower is better), ``kornia / ours`` the
speed-up over ``kornia.contrib.connected_components_union_find`` (labels only).
"""

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _bench import machine, median_ms, set_threads, smooth_blob_masks, table, write_json

from torchdefects.components import connected_components
from torchdefects.regions import region_stats


def cases(quick: bool):
    yield "sparse 16x256x256 (2% blobs)", smooth_blob_masks(16, 256, 256, 0.02, seed=1)
    yield "sparse 4x1024x1024 (2% blobs)", smooth_blob_masks(4, 1024, 1024, 0.02, seed=2)
    if not quick:
        yield "sparse 16x256x256 (1% blobs)", smooth_blob_masks(16, 256, 256, 0.01, seed=3)
        yield "sparse 4x1024x1024 (3% blobs)", smooth_blob_masks(4, 1024, 1024, 0.03, seed=4)
    g = torch.Generator().manual_seed(5)
    yield "dense 16x256x256 (50% random)", torch.rand(16, 256, 256, generator=g) < 0.5


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch and OpenCV threads (default 1)")
    p.add_argument("--batch", type=int, default=None, help="override the batch size (GPU runs)")
    p.add_argument("--quick", action="store_true", help="fewer inputs")
    p.add_argument("--no-kornia", action="store_true", help="skip the kornia anchor")
    p.add_argument("--json", default=None, help="write results here")
    args = p.parse_args(argv)
    set_threads(args.threads)
    device = args.device

    try:
        import cv2
    except ImportError:
        cv2 = None
    kornia_uf = None
    if not args.no_kornia:
        try:
            from kornia.contrib import connected_components_union_find as kornia_uf
        except ImportError:
            pass
    cupy_label = cucim_label = None
    if device.startswith("cuda"):
        try:
            import cupy
            from cupyx.scipy.ndimage import label as cupy_label
        except ImportError:
            pass
        try:  # cuCIM's skimage.measure.label, one 2-D image at a time (3-D would join images)
            from cucim.skimage.measure import label as cucim_label
        except Exception as e:  # a missing wheel or a CUDA mismatch: report, go on
            print(f"cucim unavailable: {type(e).__name__}: {e}", flush=True)

    rows = []
    for name, mask_cpu in cases(args.quick):
        if args.batch:
            reps = -(-args.batch // mask_cpu.shape[0])
            mask_cpu = mask_cpu.repeat(reps, 1, 1)[: args.batch]
            name = f"{name} x{args.batch}"
        mask = mask_cpu.to(device)
        row = {"input": name, "fg": f"{mask_cpu.float().mean().item():.3f}"}

        def ours(mask=mask):
            labels, counts = connected_components(mask)
            return region_stats(labels, counts)

        def labels_only(mask=mask):
            return connected_components(mask)

        row["ours labels+stats ms"] = t_ours = median_ms(ours, device)
        row["ours labels ms"] = median_ms(labels_only, device)
        if cv2 is not None:
            np_masks = [m.numpy().astype(np.uint8) for m in mask_cpu]

            def opencv(np_masks=np_masks):
                return [cv2.connectedComponentsWithStats(m, connectivity=8) for m in np_masks]

            row["cv2 loop ms"] = t_cv = median_ms(opencv)
            row["x cv2"] = t_ours / t_cv
        if kornia_uf is not None:
            km = mask.unsqueeze(1).float()
            row["kornia uf ms"] = t_k = median_ms(lambda km=km: kornia_uf(km), device)
            row["kornia / ours"] = t_k / t_ours
        if cupy_label is not None:
            cm = cupy.asarray(mask.to(torch.uint8))
            s = cupy.ones((3, 3), dtype=cupy.int32)

            def cupy_loop(cm=cm, s=s):
                return [cupy_label(cm[i], structure=s) for i in range(cm.shape[0])]

            row["cupy label ms"] = t_c = median_ms(cupy_loop, device)
            row["cupy / ours"] = t_c / t_ours
        if cucim_label is not None:
            cm8 = cupy.asarray(mask.to(torch.uint8))

            def cucim_loop(cm8=cm8):
                return [cucim_label(cm8[i], connectivity=2) for i in range(cm8.shape[0])]

            row["cucim label ms"] = t_cc = median_ms(cucim_loop, device)
            row["cucim / ours"] = t_cc / t_ours
        for k, v in list(row.items()):
            if isinstance(v, float):
                row[k] = round(v, 2)
        rows.append(row)
        print(table([row], list(row)), flush=True)

    columns = sorted(
        {c for r in rows for c in r}, key=lambda c: list(rows[0]).index(c) if c in rows[0] else 99
    )
    print()
    print(table(rows, columns))
    write_json(args.json, {"benchmark": "components", "machine": machine(device), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
