#!/usr/bin/env bash
# Gradient all-reduce overlapped with backward vs after it: `otter bench train-step
# --world N` (N local rank processes through the CPU ring, cores / N threads each) on the
# compute-bound config, alternating rounds, best step time of each side. Prints compute,
# all-reduce and exposed all-reduce time per step.
#
#   scripts/bench-overlap.sh [WORLD] [ROUNDS]      (OTTER_BIN=target/debug/otter: skip the release build)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
world="${1:-2}"
rounds="${2:-3}"
# OTTER_BIN: a prebuilt otter (default: a release build, brought up to date).
bin="${OTTER_BIN:-target/release/otter}"
if [ -z "${OTTER_BIN:-}" ]; then
  cargo build --release --quiet --bin otter
fi
run() { "$bin" bench train-step --model-config benches/configs/compute.json --batch 2 --seq 256 --steps 3 --warmup 1 --world "$world" "$@" | tail -1; }
best() { sort -t= -k2 -g | head -1; }
on=(); off=()
for _ in $(seq "$rounds"); do
  on+=("$(run)")
  off+=("$(run --no-overlap)")
done
field() { sed -E "s/.* $1=([0-9.]+).*/\1/"; }
echo "| all-reduce | step s | compute s | all-reduce s | exposed s | all rounds, step s |"
echo "|---|---|---|---|---|---|"
for side in overlapped after-backward; do
  if [ "$side" = overlapped ]; then lines=("${on[@]}"); else lines=("${off[@]}"); fi
  b="$(printf '%s\n' "${lines[@]}" | sed -E 's/.* step_s=([0-9.]+) .*/\1 &/' | sort -g | head -1 | cut -d' ' -f2-)"
  all="$(printf '%s\n' "${lines[@]}" | field step_s | paste -sd, -)"
  echo "| $side | $(echo "$b" | field step_s) | $(echo "$b" | sed -E 's/.* overlap=[a-z]+ buckets=[0-9]+ compute_s=([0-9.]+).*/\1/') | $(echo "$b" | field comm_s) | $(echo "$b" | field exposed_s) | $all |"
done
