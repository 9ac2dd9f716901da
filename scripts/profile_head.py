"""Where one DefectHead forward spends its time: torch.profiler over a few calls.

Prints the ops with the most self CPU time (dispatch and launch cost; on CUDA also the time
the host waits in synchronizations) and, on CUDA, the most device time, for the issue-9
config (open 3, close 3, fill holes, min_area 10, max_regions 20) on B x 1 x 256 x 256 maps.

Usage::

    python scripts/profile_head.py [--device cpu|cuda] [--batch 1] [--mode eager|scripted]
"""

import argparse

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from torchdefects import DefectHead, DefectsConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--mode", choices=["eager", "scripted"], default="scripted")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args()
    torch.manual_seed(0)
    x = F.avg_pool2d(torch.rand(args.batch, 1, 256, 256), 9, 1, 4)
    x = ((x - x.amin()) / (x.amax() - x.amin())).to(args.device)
    cfg = DefectsConfig(
        pixel_threshold=0.7, open_ksize=3, close_ksize=3, fill_holes=True, min_area=10,
        max_regions=20,
    )  # fmt: skip
    head = DefectHead(cfg).to(args.device)
    if args.mode == "scripted":
        head = torch.jit.script(head)
    cuda = args.device.startswith("cuda")
    with torch.inference_mode():
        for _ in range(5):
            head(x)
        if cuda:
            torch.cuda.synchronize()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(args.calls):
                head(x)
            if cuda:
                torch.cuda.synchronize()
    events = prof.key_averages()
    print(f"{args.mode} head, {args.batch}x1x256x256 on {args.device}, {args.calls} calls")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if cuda:
        print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
