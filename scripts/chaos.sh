#!/usr/bin/env bash
# Goodput under repeated failures: the local job (a coordinator and W CPU workers on this
# machine, the tiny model, a constant global batch) run failure-free and then under
# `kill -9` every EVERY seconds on a seeded schedule (a random worker, restarted on the same
# node id a second later; every 5th failure the coordinator, restarted on its state dir),
# each for DURATION seconds after its first committed step. Prints failures=, recoveries=,
# steps=, goodput=, exactly_once=, loss_diff_max= (per-step losses against the failure-free
# run). Exits non-zero if exactly-once fails or a committed step has no loss to compare.
#
#   scripts/chaos.sh [--workers 3] [--every 15s] [--duration 180s] [--seed S] [--coord-every 5]
#                    [--deterministic [--steps N]]
# --deterministic: the job with comm.deterministic (and train.cpu_threads: 1); both runs
# then train to step N (default 6000; failures only within DURATION) and
# final_weights_identical= compares their final weights byte for byte.
#   OTTER_BIN_DIR=target/debug scripts/chaos.sh ...   (skip the release build)
#
# Takes about 2 x DURATION plus start-up (DURATION when out/chaos-baseline.json holds a
# failure-free run of the same job, binaries and workers at least as long: a 600 s run
# then a 300 s one measure the failure-free job once); release binaries; work dir out/chaos.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WORKERS=3 EVERY=15 DURATION=180 SEED=0 COORD_EVERY=5 DETERMINISTIC=0 STEPS=6000
secs() { echo "${1%s}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --workers) WORKERS="$2"; shift 2 ;;
    --every) EVERY=$(secs "$2"); shift 2 ;;
    --duration) DURATION=$(secs "$2"); shift 2 ;;
    --seed) SEED="$2"; shift 2 ;;
    --coord-every) COORD_EVERY="$2"; shift 2 ;;
    --deterministic) DETERMINISTIC=1; shift ;;
    --steps) STEPS="$2"; shift 2 ;;
    *) echo "usage: scripts/chaos.sh [--workers N] [--every 15s] [--duration 180s] [--seed S] [--coord-every N] [--deterministic [--steps N]]" >&2; exit 2 ;;
  esac
done
bash scripts/setup.sh
bin="${OTTER_BIN_DIR:-target/release}"
if [ -z "${OTTER_BIN_DIR:-}" ]; then
  cargo build --quiet --release --bins
fi
work=out/chaos
rm -rf "$work"
mkdir -p "$work"
$bin/otter data synth --out "$work/synthetic" --samples 1200 --image-px 48 --seed 0 >/dev/null
# One job file for both runs: max_steps well past what DURATION can reach (the same LR
# schedule in both), the global batch fixed at 2 samples per rank of the full world.
python3 - "$work/job.yaml" "$WORKERS" "$DETERMINISTIC" "$STEPS" <<'PY'
import re, sys
path, workers, deterministic, steps = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
# Past what 600 s reach (or the deterministic runs' end); fixed, so that every run shares
# one LR schedule.
max_steps = steps if deterministic else 30000
global_batch = 2 * workers
epochs = max_steps * global_batch // 1100 + 2
y = open("configs/local-job.yaml").read()
y = y.replace("../tests/", "../../tests/").replace("../out/synthetic", "synthetic")
y = re.sub(r"out_dir: \S+", "out_dir: run", y)
y = re.sub(r"epochs: \d+", f"epochs: {epochs}\n  max_steps: {max_steps}\n  global_batch: {global_batch}", y, count=1)
y = re.sub(r"save_every: \d+", "save_every: 100", y)
y = re.sub(r"min_nodes: \d+", "min_nodes: 2", y)
y = re.sub(r"max_nodes: \d+", f"max_nodes: {workers}", y)
if deterministic:
    y = y.replace("train:\n", "train:\n  cpu_threads: 1\n", 1)
    y = y.replace("comm:\n", "comm:\n  deterministic: true\n", 1) if "comm:\n" in y else y + "comm:\n  deterministic: true\n"
open(path, "w").write(y)
PY
export OTTER_JOIN_TOKEN=chaos
exec python3 scripts/chaos.py --bin "$bin" --job "$work/job.yaml" --work "$work" --workers "$WORKERS" \
  --every "$EVERY" --duration "$DURATION" --seed "$SEED" --coord-every "$COORD_EVERY" \
  --baseline-cache out/chaos-baseline.json $( [ "$DETERMINISTIC" = 1 ] && echo --steps "$STEPS" )
