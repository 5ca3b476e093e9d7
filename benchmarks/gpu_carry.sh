#!/usr/bin/env bash
# Prepare, here, what the three device calls of issue 15 carry (benchmarks/README.md):
#   .gpu/parts/catsdogs-180px.zip.part-a{a,b,c}   the 172 MiB archive in 58 MiB parts
#   .gpu/whl/     the 4 wheels the CLI needs beyond the device image (from .whl/)
#   .gpu/meta/    source.json (commit, uncommitted files) and parts.sha256
# then rehearses the device's join + sha256 check in a temporary folder and prints the
# size of every call against the 64 MiB limit. All of .gpu/ and .whl/ is git-ignored.
#
#   bash benchmarks/gpu_carry.sh [ARCHIVE]     (default ../shared/data/catsdogs-180px.zip)
#   PART_SIZE=50M bash benchmarks/gpu_carry.sh (4 parts, so 4 calls; 58M gives 3)
set -euo pipefail
cd "$(dirname "$0")/.."
ZIP=${1:-../shared/data/catsdogs-180px.zip}
SHA=70e66a7841e96022514ad9a6b6ef2abd6f48b3929d0e878e36d79bdd48620bd9
PART_SIZE=${PART_SIZE:-58M}
LIMIT=$((64 * 1024 * 1024))
mkdir -p .gpu/parts .gpu/meta .gpu/whl

# 1. parts, unless the ones there already add up to the archive
if [ -s .gpu/meta/parts.sha256 ] && [ "$(cat .gpu/meta/part_size 2>/dev/null)" = "$PART_SIZE" ] \
  && sha256sum --quiet -c .gpu/meta/parts.sha256 2>/dev/null \
  && [ "$(cat .gpu/parts/catsdogs-180px.zip.part-* | sha256sum | cut -d' ' -f1)" = "$SHA" ]; then
  echo "parts: up to date"
else
  echo "$SHA  $ZIP" | sha256sum -c --quiet - || { echo "error: $ZIP is not the archive"; exit 1; }
  rm -f .gpu/parts/catsdogs-180px.zip.part-*
  split -b "$PART_SIZE" -a 2 "$ZIP" .gpu/parts/catsdogs-180px.zip.part-
  sha256sum .gpu/parts/catsdogs-180px.zip.part-* > .gpu/meta/parts.sha256
  echo "$PART_SIZE" > .gpu/meta/part_size
  echo "parts: split $ZIP into $PART_SIZE parts"
fi

# 2. wheels: the four the CLI and compare import (jsonargparse[signatures], captum)
[ -d .whl ] || bash benchmarks/fetch_wheels.sh >/dev/null
rm -f .gpu/whl/*.whl
for w in captum jsonargparse docstring_parser typeshed_client; do
  cp .whl/"$w"-*.whl .gpu/whl/
done

# 3. what code the calls carry: the commit, and what differs from it
python3 - <<'PY'
import hashlib, json, subprocess, time
def git(*a):
    return subprocess.run(["git", *a], capture_output=True, text=True, check=False).stdout
status = [line for line in git("status", "--porcelain").splitlines() if line.strip()]
diff = git("diff", "HEAD").encode()
json.dump({
    "commit": git("rev-parse", "HEAD").strip() or None,
    "from": ".gpu/meta/source.json (benchmarks/gpu_carry.sh)",
    "made_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "uncommitted": status,
    "diff_sha256": hashlib.sha256(diff).hexdigest() if diff else None,
}, open(".gpu/meta/source.json", "w"), indent=2)
PY

# 4. rehearse the device's join and check
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cat .gpu/parts/catsdogs-180px.zip.part-* > "$tmp/catsdogs-180px.zip"
echo "$SHA  $tmp/catsdogs-180px.zip" | sha256sum -c --quiet - && echo "rehearsal: joined parts, sha256 ok"

# 5. sizes per call (the working tree travels with every call)
code=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null \
  | awk '{s += $1} END {print s + 0}')
size() { du -cb "$@" | tail -1 | cut -f1; }
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
parts=(.gpu/parts/catsdogs-180px.zip.part-*)
echo "code (tracked + untracked, not ignored): $(mib "$code")"
echo ".gpu/whl: $(mib "$(size .gpu/whl)")   .gpu/meta: $(mib "$(size .gpu/meta)")   .whl (all, not carried): $(mib "$(size .whl)")"
n=${#parts[@]}
for i in "${!parts[@]}"; do
  p=${parts[$i]}
  carry="$p .gpu/meta"
  [ "$i" -eq 0 ] && carry="$carry .gpu/whl"
  total=$((code + $(size $carry)))
  flag=ok; [ "$total" -le "$LIMIT" ] || flag="OVER 64 MiB"
  cmd='python3 benchmarks/gpu_train.py --stage'
  [ "$i" -eq $((n - 1)) ] && cmd='bash benchmarks/gpu_train.sh'
  printf 'call %d: carry [%s]  %s (%s)  command: %s\n' $((i + 1)) \
    "$(echo "$carry" | sed 's/ /", "/g; s/^/"/; s/$/"/')" "$(mib "$total")" "$flag" "$cmd"
done
