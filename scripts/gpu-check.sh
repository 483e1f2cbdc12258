#!/usr/bin/env bash
# GPU checks: everything in tests/gpu.rs (CUDA parity in f32 and bf16; later issues add
# their own; with feature nccl the NCCL world-1 check), run with --ignored so that a missing GPU is a failure, not a skip.
#
#   scripts/gpu-check.sh                 # on a GPU machine: set up, build, run
#   OTTER_GPU_BINS=DIR scripts/gpu-check.sh
#                                        # run prebuilt test binaries from DIR (a machine
#                                        # without cargo; LD_LIBRARY_PATH must reach a
#                                        # libtorch, see scripts/build-gpu-bins.sh)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -n "${OTTER_GPU_BINS:-}" ]; then
  status=0
  for bin in "$OTTER_GPU_BINS"/gpu-*; do
    echo "== $bin"
    "$bin" --ignored --nocapture --test-threads=1 || status=1
  done
  exit $status
fi
bash scripts/setup.sh
cargo test --features nccl --test gpu -- --ignored --nocapture --test-threads=1
