#!/usr/bin/env bash
# The main job on the embedded defaults, from a fresh clone: set-up (idempotent), build,
# a synthetic MIMIC-IT dataset, then a single-process training run of the tiny Otter
# model (configs/tiny.yaml) with progress, metrics and a final-weights export.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
cargo build --quiet --bin otter
otter=target/debug/otter
if [ ! -f out/synthetic/SYN_train.json ]; then
  $otter data synth --out out/synthetic --samples 64 --image-px 48 --seed 0
fi
echo "== data"
$otter data validate --config configs/tiny.yaml
echo
echo "== train (configs/tiny.yaml)"
rm -rf out/tiny-run
$otter train --config configs/tiny.yaml
echo
echo "metrics: out/tiny-run/metrics.jsonl   weights: out/tiny-run/final_weights.safetensors"
