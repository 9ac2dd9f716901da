#!/usr/bin/env bash
# One command for a CUDA machine: the CUDA tests, then the GPU benchmarks.
#
#   bash scripts/gpu_check.sh [OUTDIR]      (default: $OUT, else ./gpu_check_out)
#
# Needs torch with CUDA, numpy, scipy, OpenCV, pytest (+ xdist) and hypothesis on the host.
# kornia (an anchor and a test oracle) and cuCIM (an anchor) are installed from wheels in
# ./.whl when present (a host with no network: see docs/benchmarks.md). Writes
# OUTDIR/summary.txt, the pytest log and one JSON file per benchmark. Each step has its own
# time limit; the whole script fits in about 9 minutes on an H100 or H200.
set -u
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_check_out}}
device=${GPU_CHECK_DEVICE:-cuda}  # cpu: dry run of this script on a machine without a GPU
mkdir -p "$out"
summary="$out/summary.txt"
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/torchdefects_site .whl/*.whl && export PYTHONPATH=/tmp/torchdefects_site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

note "== $(date -u +%FT%TZ) torchdefects gpu_check"
python3 - <<'PY' 2>&1 | tee -a "$summary"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0))
for name in ("kornia", "cv2", "cupy", "cucim", "scipy", "onnxruntime"):
    try:
        mod = __import__(name)
        print(name, getattr(mod, "__version__", "?"))
    except Exception as exc:  # report, keep going
        print(name, "missing:", type(exc).__name__, exc)
PY

# CUDA tests: every test parametrized on device=cuda, plus CUDA-only tests.
note "== pytest -m cuda"
timeout 180 python3 -m pytest -q -m cuda -n 8 -p no:cacheprovider --continue-on-collection-errors \
    tests 2>&1 | tee "$out/pytest_cuda.log" | tail -n 30
note "pytest: $(tail -n 1 "$out/pytest_cuda.log")"
grep -E "^(FAILED|ERROR)" "$out/pytest_cuda.log" | head -n 40 | tee -a "$summary"

run_bench() {  # seconds, name, then extra arguments
    local limit=$1 name=$2
    shift 2
    note "== $name --device $device $*"
    # Logs stay out of OUTDIR (few files come back from a lent machine); their tails go to
    # the summary.
    timeout "$limit" python3 "scripts/$name.py" --device "$device" --json "$out/$name$tag.json" "$@" \
        > "/tmp/$name$tag.log" 2>&1
    local rc=$?
    tail -n 24 "/tmp/$name$tag.log" | tee -a "$summary"
    note "$name exit $rc"
}
# torch.use_deterministic_algorithms(True): the head must still run (and give the same bits).
note "== deterministic mode"
timeout 60 python3 - <<'PY' 2>&1 | tail -n 6 | tee -a "$summary"
import torch, torch.nn.functional as F
import torchdefects as td
torch.manual_seed(0)
x = F.avg_pool2d(torch.rand(8, 1, 128, 128), 9, 1, 4)
x = ((x - x.amin()) / (x.amax() - x.amin())).cuda()
cfg = td.DefectsConfig(pixel_threshold=0.7, open_ksize=3, close_ksize=3, fill_holes=True,
                       min_area=10, max_regions=20)
head = td.DefectHead(cfg).cuda()
ref = head(x)
torch.use_deterministic_algorithms(True)
for name, h in (("eager", head), ("scripted", torch.jit.script(head))):
    try:
        out = h(x)
        same = torch.equal(out.labels, ref.labels) and torch.equal(out.regions.area, ref.regions.area)
        print(f"deterministic mode, {name}: ok, same as default mode: {same}")
    except Exception as exc:
        print(f"deterministic mode, {name}: FAILS: {type(exc).__name__}: {str(exc)[:300]}")
PY

tag="" run_bench 80 bench_components --quick
tag="_b64" run_bench 50 bench_components --quick --batch 64
tag="" run_bench 70 bench_head --quick --skip-cpu --modes eager,scripted
tag="_compiled" run_bench 90 bench_head --quick --skip-cpu --modes static,compiled_static --gpu-batches 1,64
# Which stage breaks reduce-overhead (CUDA-graph trees), and whether trees off works.
note "== repro_cudagraph_trees --batch 1"
timeout 120 python3 scripts/repro_cudagraph_trees.py --batch 1 --limit 100 2>&1 | grep -v Warning \
    | tail -n 12 | tee -a "$summary"
# Where a batch-1 forward spends its time (host overhead against device time).
note "== profile_head --batch 1 --mode scripted"
timeout 60 python3 scripts/profile_head.py --batch 1 --mode scripted --rows 15 > /tmp/profile_b1.log 2>&1
grep -E "Self CPU time total|Self CUDA time total|cudaLaunchKernel|cudaStreamSynchronize|cudaMemcpyAsync" \
    /tmp/profile_b1.log | head -n 8 | tee -a "$summary"
note "== done $(date -u +%FT%TZ)"
