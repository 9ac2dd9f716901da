#!/usr/bin/env bash
# One command for a CUDA machine: the CUDA tests, then every benchmark in GPU mode.
#
#   bash scripts/gpu_check.sh [OUTDIR]      (default: $OUT, else ./gpu_check_out)
#
# Needs torch with CUDA, numpy, scipy, OpenCV, pytest and hypothesis on the host.
# kornia is installed from wheels in ./.whl when present (a host with no network:
# see docs/benchmarks.md for how to fetch them). Writes OUTDIR/summary.txt, the
# pytest log and one JSON file per benchmark. Fits in about 8 minutes on an H100.
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
for name in ("kornia", "cv2", "cupy", "scipy"):
    try:
        mod = __import__(name)
        print(name, getattr(mod, "__version__", "?"))
    except Exception as exc:  # report, keep going
        print(name, "missing:", type(exc).__name__, exc)
PY

# CUDA tests: every test parametrized on device=cuda, plus CUDA-only tests.
note "== pytest -m cuda"
timeout 200 python3 -m pytest -q -m cuda -p no:cacheprovider --continue-on-collection-errors tests 2>&1 | tee "$out/pytest_cuda.log" | tail -n 25
note "pytest: $(tail -n 1 "$out/pytest_cuda.log")"

run_bench() {  # name, then extra arguments
    local name=$1
    shift
    note "== $name --device $device --quick $*"
    timeout 100 python3 "scripts/$name.py" --device "$device" --quick --json "$out/$name$tag.json" "$@" \
        > "$out/$name$tag.log" 2>&1
    local rc=$?
    tail -n 20 "$out/$name$tag.log" | tee -a "$summary"
    note "$name exit $rc"
}
tag="" run_bench bench_components
tag="_b64" run_bench bench_components --batch 64
tag="_b64" run_bench bench_head --batch 64
tag="" run_bench bench_calibration
tag="" run_bench bench_run --num-workers 4
note "== done $(date -u +%FT%TZ)"
