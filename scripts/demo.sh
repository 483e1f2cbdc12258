#!/usr/bin/env bash
# The main job on the embedded defaults, from a fresh clone: set-up (idempotent), build,
# then a single-process run of the tiny Otter model on the shipped fixture (forward +
# backward through `otter eval`), checked against upstream's loss.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
cargo build --quiet --bin otter
otter=target/debug/otter
out="${TMPDIR:-/tmp}/otter-demo"
mkdir -p "$out"
echo "== model-info (7B preset, computed from the config alone)"
$otter model-info --config otter_llama7b
echo
echo "== data: the tiny run config's MIMIC-IT samples (fixture dataset)"
$otter data validate --config configs/tiny.yaml
echo
echo "== eval of the tiny model on an in-context batch (forward + backward)"
$otter eval --model tests/fixtures/tiny_otter --inputs tests/fixtures/parity/incontext.safetensors \
  --out "$out/incontext.safetensors" --grads
echo "upstream PyTorch loss on the same batch: 5.737998 (tests/fixtures/parity)"
