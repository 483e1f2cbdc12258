#!/usr/bin/env bash
# The main job on the embedded defaults, from a fresh clone: set-up (idempotent), build,
# a synthetic MIMIC-IT dataset, then a local distributed job: `otter-coord start` (state in
# its embedded store under out/local-job/coord) and two CPU workers (`otter-worker join`)
# training the tiny Otter model (configs/local-job.yaml), with rank 0's progress and the
# coordinator's summary (steps, samples, final loss, recoveries, exactly-once check).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/progress.sh
echo "== otter demo: on a fresh 2-core machine the first run takes about 16 min: the Debian"
echo "   packages and the 5 GB torch wheel (about 6 min, once per machine) and the first debug"
echo "   build (about 9 min, once per clone); later runs start training within a minute."
echo "== set-up"
bash scripts/setup.sh
echo "== build (cargo build --bins)"
with_progress "cargo build --bins" cargo build --bins
bin=target/debug
if [ ! -f out/synthetic/SYN_train.json ]; then
  $bin/otter data synth --out out/synthetic --samples 64 --image-px 48 --seed 0
fi
echo "== data"
$bin/otter data validate --config configs/local-job.yaml
rm -rf out/local-job
mkdir -p out/local-job
export OTTER_JOIN_TOKEN="${OTTER_JOIN_TOKEN:-$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')}"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
echo
echo "== coordinator (configs/local-job.yaml)"
$bin/otter-coord start --config configs/local-job.yaml --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 \
  >out/local-job/coord.out 2>out/local-job/coord.log &
coord_pid=$!
pids+=("$coord_pid")
for _ in $(seq 100); do
  addr=$(sed -nE 's/^otter-coord listening on ([^ ]+).*/\1/p' out/local-job/coord.out)
  [ -n "$addr" ] && break
  sleep 0.1
done
[ -n "$addr" ] || { cat out/local-job/coord.log; exit 1; }
http=$(sed -nE 's/^otter-coord http on ([^ ]+).*/\1/p' out/local-job/coord.out)
echo "listening on $addr (log: out/local-job/coord.log); status page: http://$http/status, metrics: http://$http/metrics"
echo
echo "== workers a and b (b's log: out/local-job/worker-b.log)"
$bin/otter-worker join --coord "$addr" --node-id b --cpu-ranks 1 --advertise-host 127.0.0.1 \
  >out/local-job/worker-b.log 2>&1 &
pids+=("$!")
$bin/otter-worker join --coord "$addr" --node-id a --cpu-ranks 1 --advertise-host 127.0.0.1
wait "$coord_pid"
echo
echo "== summary"
tail -n 1 out/local-job/coord.out
echo "checkpoints: $(ls out/local-job/checkpoints 2>/dev/null | tr '\n' ' ')(manifests written by the coordinator)"
echo "job status: out/local-job/coord/status.json   weights: out/local-job/final_weights.safetensors"
