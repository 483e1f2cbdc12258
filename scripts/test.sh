#!/usr/bin/env bash
# The whole test suite, from a fresh clone: set-up (idempotent), then every test.
# GPU checks live in scripts/gpu-check.sh; benchmarks have their own commands.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# Kubernetes manifests (cluster/): render every overlay, strict schema validation,
# cross-references, dashboard metric names, Dockerfiles.
bash scripts/test-cluster.sh
# The control plane (otter-core: the coordinator and everything it uses) builds alone,
# without libtorch; its own test checks that `otter-coord` does not link it.
cargo build --quiet -p otter-core
# The NCCL backend (C++ shim over libtorch's c10d) must compile and link even without a GPU.
cargo build --quiet --features nccl
cargo test "$@"
