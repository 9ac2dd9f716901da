"""Narrow down ``torch.compile(mode="reduce-overhead")`` failures of the head on CUDA.

On torch 2.11 (H200, 2026-11-27) both heads failed under ``reduce-overhead`` inside
CUDA-graph trees ("storage data ptrs are not allocated in pool"), while default-mode
``torch.compile`` worked. This script compiles growing prefixes of the static head's
pipeline, each with CUDA-graph trees on and off, runs each three times, and prints one line
per case: ``ok`` with the median replay time, or the exception. The smallest failing prefix
is the upstream repro to file; a prefix that works with trees off names a workaround
(``torch._inductor.config.triton.cudagraph_trees = False``).

Usage::

    python scripts/repro_cudagraph_trees.py [--batch 1] [--size 256] [--limit 100]

Needs a CUDA device; prints one line and exits 0 without one.
"""

import argparse
import statistics
import time
from typing import Callable, List, Tuple

import torch
import torch.nn.functional as F

import torchdefects as td


class _Prefix(torch.nn.Module):
    """The static head's first ``depth`` stages (1: threshold ... 5: the whole head)."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.depth = depth
        cfg = td.DefectsConfig(pixel_threshold=0.7, open_ksize=3, close_ksize=3,
                               fill_holes=True, min_area=10, max_regions=20)  # fmt: skip
        self.head = td.DefectHead(cfg, static_output=True)
        self.register_buffer("threshold", torch.tensor(0.7))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        if self.depth >= 5:
            out = self.head(x)
            return (out.mask, out.num_regions, out.boxes, out.area)
        m = td.binarize(x, self.threshold)
        if self.depth >= 2:
            m = td.closing(td.opening(m, 3), 3)
        if self.depth >= 3:
            m = td.fill_holes(m)
        if self.depth >= 4:
            labels, counts = td.connected_components(m)
            return (labels, counts)
        return (m,)


STAGES = {1: "binarize", 2: "+ opening, closing", 3: "+ fill_holes",
          4: "+ connected_components", 5: "static head (all stages)"}  # fmt: skip


def _time(fn: Callable[[torch.Tensor], object], x: torch.Tensor, n: int = 20) -> float:
    ts: List[float] = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(x)
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--limit", type=float, default=100.0, help="seconds; skip what is left")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("repro_cudagraph_trees: no CUDA device; nothing to do")
        return
    import torch._inductor.config as inductor_config

    torch.manual_seed(0)
    x = F.avg_pool2d(torch.rand(args.batch, 1, args.size, args.size), 9, 1, 4)
    x = ((x - x.amin()) / (x.amax() - x.amin())).cuda()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}, x {tuple(x.shape)}")
    start = time.monotonic()
    for depth, name in STAGES.items():
        for trees in (True, False):
            if time.monotonic() - start > args.limit:
                print(f"stop: over --limit {args.limit:.0f} s")
                return
            torch._dynamo.reset()
            inductor_config.triton.cudagraph_trees = trees
            module = _Prefix(depth).cuda().eval()
            with torch.inference_mode():
                ref = module(x)
                try:
                    fn = torch.compile(module, mode="reduce-overhead", dynamic=False)
                    for _ in range(3):
                        out = fn(x)
                    same = all(torch.equal(a, b) for a, b in zip(out, ref))
                    ms = _time(fn, x)
                    eager = _time(module, x)
                    result = f"ok, {ms:.3f} ms (eager {eager:.3f} ms), same as eager: {same}"
                except Exception as exc:  # the point: report and go on
                    result = f"FAILS: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            print(f"depth {depth} ({name}), cudagraph_trees={trees}: {result}", flush=True)


if __name__ == "__main__":
    main()
