#!/usr/bin/env bash
# The cost of comm.deterministic: the demo's local job with the float reduction and with
# the deterministic one, alternating (scripts/bench-deterministic.py), plus the all-reduce
# at 64 MB for 2 and 4 ranks (plain ring vs exact limbs), one run, release binaries.
#   scripts/bench-deterministic.sh [--workers 2] [--steps 400] [--rounds 3]
#   OTTER_BIN_DIR=target/release scripts/bench-deterministic.sh ...   (skip the build)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
bin="${OTTER_BIN_DIR:-target/release}"
if [ -z "${OTTER_BIN_DIR:-}" ]; then
  cargo build --quiet --release --bins
fi
work=out/bench-deterministic
rm -rf "$work"
mkdir -p "$work"
$bin/otter data synth --out "$work/synthetic" --samples 1200 --image-px 48 --seed 0 >/dev/null
for world in 2 4; do
  for mode in "" --exact; do
    echo "all-reduce, world $world ${mode:-(float, shm)}: $($bin/otter bench allreduce --world "$world" --size-mb 64 --iters 5 $mode)"
  done
done
python3 scripts/bench-deterministic.py "$bin" --work "$work" "$@"
