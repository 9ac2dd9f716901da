"""Peak memory of ``torchdefects run`` against the number of inputs (issue #8, item 8).

Makes N tiny maps (8x8 .npy), runs ``python -m torchdefects run`` over them in a fresh
process for each N, and reads that process's peak RSS (``ru_maxrss`` of the child). The
growth per input, beyond the input path list itself, is the bookkeeping the run keeps per
input; the target is at most 1 KB.

    python scripts/bench_memory.py                  # 2,000 and 20,000 maps
    python scripts/bench_memory.py --n 500 5000 --json mem.json
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _make(d, n):
    os.makedirs(d, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        np.save(os.path.join(d, f"m{i:07d}.npy"), rng.random((8, 8), dtype=np.float32))


def _peak_rss(cmd, env):
    """(peak RSS in bytes of the child, seconds) for one command run to completion."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    secs = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the max over all waited children: run the largest N last.
    return max(after, before) * 1024, secs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[2000, 20000])
    ap.add_argument("--regions-jsonl", action="store_true", help="also write regions.jsonl")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in sorted(args.n):
            maps = os.path.join(tmp, f"maps{n}")
            _make(maps, n)
            path_list = sum(
                sys.getsizeof(os.path.join(maps, f"m{i:07d}.npy")) + 8 for i in range(n)
            )
            cmd = [sys.executable, "-m", "torchdefects", "run", "--maps", maps, "--out",
                   os.path.join(tmp, f"out{n}"), "--pixel-threshold", "0.5", "--batch-size", "64",
                   "--quiet"] + (["--regions-jsonl"] if args.regions_jsonl else [])  # fmt: skip
            rss, secs = _peak_rss(cmd, env)
            rows.append({"n": n, "peak_rss_bytes": rss, "path_list_bytes": path_list, "s": secs})
            print(f"{n:>7} maps: peak RSS {rss / 2**20:.1f} MiB, path list "
                  f"{path_list / 2**20:.2f} MiB, {secs:.1f} s")  # fmt: skip
    a, b = rows[0], rows[-1]
    beyond = [r["peak_rss_bytes"] - r["path_list_bytes"] for r in (a, b)]
    per = (beyond[1] - beyond[0]) / (b["n"] - a["n"])
    total = (b["peak_rss_bytes"] - a["peak_rss_bytes"]) / (b["n"] - a["n"])
    print(f"growth: {total:.0f} B per input in all, {per:.0f} B per input beyond the path list")
    if args.json:
        meta = {"python": platform.python_version(), "machine": platform.machine(),
                "cpu_count": os.cpu_count()}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "per_input_beyond_paths": per, "meta": meta}, f, indent=2)


if __name__ == "__main__":
    main()
