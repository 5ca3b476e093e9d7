#!/usr/bin/env bash
# Issue 7's whole GPU run on one H100: seed + control (concurrently: batch 20 leaves the
# GPU mostly idle), then the fast recipe; test each; write results/<config>/.
#
# Needs, in the repository root (git-ignored, carried to the GPU machine):
#   .whl/   wheels from benchmarks/fetch_wheels.sh
#   .gpu/   the full archive, either whole (catsdogs-180px.zip) or as parts made here with
#           `split -b 60M ../shared/data/catsdogs-180px.zip .gpu/catsdogs-180px.zip.part-`
#           (carry one part per call; they stay while the machine is warm)
# Usage: bash benchmarks/gpu_train.sh [RESULTS_DIR]      (default: results/)
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-results}
LOGS=${OUT:-/tmp/gpu-train}
mkdir -p "$RESULTS" "$LOGS"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
ZIP=.gpu/catsdogs-180px.zip
[ -f "$ZIP" ] || cat .gpu/catsdogs-180px.zip.part-* > "$ZIP"
echo "70e66a7841e96022514ad9a6b6ef2abd6f48b3929d0e878e36d79bdd48620bd9  $ZIP" | sha256sum -c - || exit 1
export LIGHTNING_VGG_CACHE=/tmp/lvcache PYTHONUNBUFFERED=1
RUNS=/tmp/gpu-runs
common=(--data.source="$ZIP" --trainer.logger.init_args.save_dir="$RUNS" --trainer.enable_progress_bar=false
        --data.num_workers=6)
t0=$(date +%s)
# Scan and extract once, before the two concurrent fits.
python3 -c "from lightning_vgg.data.sources import index_source; index_source('$ZIP', workers=8)"

fit_test() {  # config, extra args...
  local cfg=$1; shift
  python3 -m lightning_vgg fit --config "configs/$cfg.yaml" "${common[@]}" "$@" > "$LOGS/$cfg.log" 2>&1
  local run; run=$(ls -d "$RUNS/$cfg"/version_* | tail -1)
  python3 -m lightning_vgg test --config "configs/$cfg.yaml" --ckpt_path "$run/checkpoints/best.ckpt" \
    "${common[@]}" >> "$LOGS/$cfg.log" 2>&1
  mkdir -p "$RESULTS/$cfg"
  cp "$run"/{summary.json,summary.md,metrics.csv,history.png,split.csv} "$RESULTS/$cfg/" 2>/dev/null
  cp "$run"/misclassified_*.png "$RESULTS/$cfg/" 2>/dev/null
  echo "$cfg done after $(( $(date +%s) - t0 )) s"; cat "$RESULTS/$cfg/summary.md"
}

fit_test seed --data.augment_backend=gpu --data.gpu_decode=true &
fit_test control --data.augment_backend=gpu --data.gpu_decode=true &
wait
fit_test fast
seed_run=$(ls -d "$RUNS/seed"/version_* | tail -1); control_run=$(ls -d "$RUNS/control"/version_* | tail -1)
python3 -m lightning_vgg compare --good "$seed_run/checkpoints/best.ckpt" --bad "$control_run/checkpoints/best.ckpt" \
  --out "$RESULTS/seed_vs_control" >> "$LOGS/compare.log" 2>&1
fast_run=$(ls -d "$RUNS/fast"/version_* | tail -1)
python3 -m lightning_vgg compare --good "$fast_run/checkpoints/best.ckpt" --bad "$control_run/checkpoints/best.ckpt" \
  --out "$RESULTS/fast_vs_control" >> "$LOGS/compare.log" 2>&1
nvidia-smi -L > "$RESULTS/gpu.txt"; echo "total wall time $(( $(date +%s) - t0 )) s" | tee -a "$RESULTS/gpu.txt"
