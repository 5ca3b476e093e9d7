#!/usr/bin/env bash
# The whole benchmark on one GPU machine, in about 4-6 minutes (see benchmarks/README.md).
#
# Expects, in the repository root: .whl/ from benchmarks/fetch_wheels.sh, and the mini
# archive at .gpu/catsdogs-180px-mini.zip (both git-ignored: carry them). Writes
# $OUT/gpu.json, $OUT/gpu.md and $OUT/bench.log ($OUT defaults to /tmp/gpu-out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD
{
  date -u
  nvidia-smi -L
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv,noheader
  python3 -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'
  nproc
  uptime
} 2>&1 | tee "$OUT/bench.log"

DATA=${DATA:-.gpu/catsdogs-180px-mini.zip}
# Section budgets add up to 340 s; the outer timeout is the last resort.
timeout -k 10 370 python3 benchmarks/bench.py --device cuda --data "$DATA" \
  --cache-dir /tmp/lightning_vgg_bench \
  --budget loader=90 --budget train=180 --budget atlas=70 \
  --json "$OUT/gpu.json" --md "$OUT/gpu.md" "$@" 2>&1 | tee -a "$OUT/bench.log"
rc=${PIPESTATUS[0]}
echo "bench.py exit status $rc" | tee -a "$OUT/bench.log"
exit "$rc"
