#!/usr/bin/env bash
# The whole test suite, from a fresh clone: set-up (idempotent), then every test.
# GPU checks live in scripts/gpu-check.sh; benchmarks have their own commands.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# Kubernetes manifests (cluster/): render every overlay, strict schema validation,
# cross-references, dashboard metric names, Dockerfiles.
bash scripts/test-cluster.sh
# The source tree's structure: no new import cycle between files, no new file over 900
# lines (scripts/structure-baseline.txt lists the debts on their way out).
python3 scripts/check-structure.py
# The control plane (otter-core: the coordinator and everything it uses) builds alone,
# without libtorch; its own test checks that `otter-coord` does not link it.
cargo build --quiet -p otter-core
# The NCCL backend (C++ shim over libtorch's c10d) must compile and link even without a GPU:
# the library with the shim and the one binary that uses it (not every test binary again).
cargo build --quiet --features nccl --bin otter-worker
# cargo-nextest where installed (each test its own process, tests that run jobs one at a
# time: .config/nextest.toml), else cargo test. Either way: the ten slowest and the total.
log=target/test-run.log
skipped=target/tmp/skipped-tests.txt
mkdir -p target/tmp
rm -f "$skipped"
rc=0
if command -v cargo-nextest >/dev/null && [ "${OTTER_TEST_RUNNER:-nextest}" = nextest ]; then
  cargo nextest run --cargo-quiet "$@" 2>&1 | tee "$log" || rc=$?
  echo "== the ten slowest tests"
  grep -E '^ +(PASS|FAIL|SLOW|TIMEOUT|SIGKILL|SIGSEGV|SIGABRT) \[ *[0-9.]+s\]' "$log" | sed -E 's/^ +[A-Z]+ \[ *([0-9.]+)s\] +(\( *[0-9]+\/[0-9]+\) +)?(.*)$/\1 \3/' | sort -rn | head -10 | awk '{printf "  %8.1f s  %s\n", $1, substr($0, index($0, " ") + 1)}' || true
else
  # One test at a time: the integration tests are one binary (tests/it), and the tests that
  # measure their process (RSS, the heap) must not share it with others.
  RUST_TEST_THREADS=1 cargo test "$@" 2>&1 | tee "$log" || rc=$?
  echo "== test binaries by time (cargo test reports no per-test times)"
  grep -E '^test result: .* finished in [0-9.]+s' "$log" | sed -E 's/.*finished in ([0-9.]+)s/\1/' | sort -rn | head -10 | sed 's/^/  /' || true
fi
if [ -s "$skipped" ]; then
  echo "== tests that could not run their case here (reported as passed by the runner; CI=true fails them):"
  sed 's/^/  /' "$skipped"
fi
echo "== scripts/test.sh: ${SECONDS} s in all (set-up, builds, tests)"
exit "$rc"
