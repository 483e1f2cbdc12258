#!/usr/bin/env bash
# GPU checks: everything in tests/gpu.rs (CUDA parity in f32 and bf16, bf16 overfit, step
# time of a 1B config; with feature nccl: the NCCL world-1 check, the overlapped gradient
# sync's compute / communication / exposed time on the 1B config, and a real job:
# otter-coord + otter-worker join --gpus 1 over NCCL through a forced regroup; two rank
# processes sharing the GPU over the ring, comm.backend: ring, against world 1), run with
# --ignored so that a missing GPU is a failure, not a skip.
#
#   scripts/gpu-check.sh                 # on a GPU machine: set up, build, run
#   OTTER_GPU_BINS=DIR scripts/gpu-check.sh
#                                        # run prebuilt test binaries from DIR (a machine
#                                        # without cargo; LD_LIBRARY_PATH must reach a
#                                        # libtorch, see scripts/build-gpu-bins.sh)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -n "${OTTER_GPU_BINS:-}" ]; then
  # The binaries' TCMalloc came along with them (scripts/build-gpu-bins.sh).
  export LD_LIBRARY_PATH="$(cd "$OTTER_GPU_BINS" && pwd)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  status=0
  for bin in "$OTTER_GPU_BINS"/gpu-*; do
    echo "== $bin"
    "$bin" --ignored --nocapture --test-threads=1 || status=1
  done
  exit $status
fi
bash scripts/setup.sh
cargo build --features nccl --bins
cargo build -p otter-core --bin otter-coord
cargo test --features nccl --test gpu -- --ignored --nocapture --test-threads=1
