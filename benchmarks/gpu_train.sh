#!/usr/bin/env bash
# Issue 15 on one GPU machine, in one device call: seed + control trained concurrently,
# tested, compared, packed into $OUT/issue15-results.tar (see benchmarks/README.md).
#
#   bash benchmarks/gpu_train.sh [gpu_train.py options]      e.g. --precision 32-true
#
# benchmarks/gpu_train.py does the work and ends itself by its --budget (530 s); the
# outer timeout (LIMIT, default 545 s) is the last resort: its SIGTERM makes the driver
# pack what it has. Give the device call timeout_s >= LIMIT + 15.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
LIMIT=${LIMIT:-545}
timeout -k 10 "$LIMIT" python3 benchmarks/gpu_train.py "$@"
rc=$?
[ "$rc" -eq 124 ] && echo "gpu_train.sh: stopped by the outer timeout after $LIMIT s"
exit "$rc"
