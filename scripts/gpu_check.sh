#!/usr/bin/env bash
# The GPU check in one device call: every test marked gpu, then the GPU benchmark, logs and results under $OUT.
#   bash scripts/gpu_check.sh [tests|bench|all] [extra benchmark arguments...]
# Runs with the device machine's python3 (torch+CUDA, triton, torchvision, transformers) and this checkout on PYTHONPATH.
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kiln-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 KILN_PROGRESS=0
what=${1:-all}
shift || true
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, sys; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
status=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  python3 -m pytest -q -p no:cacheprovider -m gpu tests -rs 2>&1 | tee "$OUT/tests.log" || status=1
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  python3 benchmarks/gpu.py --out "$OUT" "$@" 2>&1 | tee "$OUT/bench.log" || status=1
fi
exit $status
