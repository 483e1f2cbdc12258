#!/usr/bin/env bash
# Ranks sharing a machine: the demo's job (configs/local-job.yaml: a coordinator and two
# CPU workers on this machine) as shipped, against the same job with OMP_NUM_THREADS=1
# forced on the workers (what torchrun does), and against `otter train` in one process on
# the same data and global batch (grad_accum 2 x batch 2). Rounds alternate; best of
# ROUNDS each. Times: the whole job (first worker started -> coordinator exited) and its
# training part (first step started -> last step done, from rank 0's log), so that the
# rendezvous's fixed waits (last_call) do not hide a slow step. Appends a line to
# BENCHMARKS.md.
#
#   scripts/bench-threads.sh [ROUNDS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROUNDS="${1:-3}"
bash scripts/setup.sh
cargo build --quiet --release --bins
bin=target/release
work=out/bench-threads
rm -rf "$work"
mkdir -p "$work"
$bin/otter data synth --out out/synthetic --samples 64 --image-px 48 --seed 0 >/dev/null 2>&1 || true
[ -f out/synthetic/SYN_train.json ] || $bin/otter data synth --out out/synthetic --samples 64 --image-px 48 --seed 0
export OTTER_JOIN_TOKEN=bench-threads

now() { date +%s.%N; }

# One distributed run; prints "total training".
distributed() {
  local env_workers="$1" dir="$work/dist-$2"
  rm -rf "$dir" out/local-job
  mkdir -p "$dir"
  local t0 coord
  $bin/otter-coord start --config configs/local-job.yaml --listen 127.0.0.1:0 --http-listen off --state-dir "$dir/coord" \
    >"$dir/coord.out" 2>"$dir/coord.log" &
  coord=$!
  local addr=""
  for _ in $(seq 200); do
    addr=$(sed -nE 's/^otter-coord listening on ([^ ]+).*/\1/p' "$dir/coord.out")
    [ -n "$addr" ] && break
    sleep 0.05
  done
  t0=$(now)
  env $env_workers $bin/otter-worker join --coord "$addr" --node-id b --cpu-ranks 1 --advertise-host 127.0.0.1 >"$dir/b.log" 2>&1 &
  env $env_workers $bin/otter-worker join --coord "$addr" --node-id a --cpu-ranks 1 --advertise-host 127.0.0.1 >"$dir/a.log" 2>&1 &
  wait "$coord"
  local t1
  t1=$(now)
  wait || true
  local train
  train=$(python3 - "$dir/a.log" <<'EOF'
import re, sys
steps = [float(m.group(1)) for m in re.finditer(r"step +\d+ .* step ([0-9.]+) s", open(sys.argv[1]).read())]
print(f"{sum(steps):.3f}")
EOF
)
  echo "$(echo "$t1 - $t0" | bc -l) $train"
}

# One single-process run of the same job: grad_accum 2 (the global batch of 2 ranks).
single() {
  local dir="$work/single-$1"
  rm -rf "$dir"
  mkdir -p "$dir"
  python3 - "$dir/job.yaml" <<'EOF'
import sys, re
y = open("configs/local-job.yaml").read()
y = y.replace("grad_accum: 1 ", "grad_accum: 2 ")
y = re.sub(r"out_dir: \S+", "out_dir: run", y)
y = y.replace("../tests/", "../../../tests/").replace("../out/synthetic", "../../synthetic")
y = y.split("\ncoord:")[0] + "\n"
open(sys.argv[1], "w").write(y)
EOF
  local t0 t1
  t0=$(now)
  $bin/otter train --config "$dir/job.yaml" >"$dir/train.log" 2>&1
  t1=$(now)
  local train
  train=$(python3 -c "import json,sys; print(round(sum(json.loads(l)['step_time_s'] for l in open('$dir/run/metrics.jsonl')), 3))")
  echo "$(echo "$t1 - $t0" | bc -l) $train"
}

best() { sort -g | head -n 1; }
shipped=() forced=() one=()
for r in $(seq "$ROUNDS"); do
  shipped+=("$(distributed "" "shipped-$r")")
  forced+=("$(distributed "OMP_NUM_THREADS=1" "omp1-$r")")
  one+=("$(single "$r")")
  echo "round $r: shipped ${shipped[-1]}  OMP_NUM_THREADS=1 ${forced[-1]}  otter train ${one[-1]}  (total s, training s)"
done
col() { printf '%s\n' "$@" | awk -v c="$COL" '{print $c}' | best; }
COL=1; s_tot=$(col "${shipped[@]}"); f_tot=$(col "${forced[@]}"); o_tot=$(col "${one[@]}")
COL=2; s_tr=$(col "${shipped[@]}"); f_tr=$(col "${forced[@]}"); o_tr=$(col "${one[@]}")
line=$(printf '| %s | %s | %.2f s / %.2f s | %.2f s / %.2f s | %.2f s / %.2f s | %.2fx / %.2fx | %.2fx / %.2fx |' \
  "$(date -u +%Y-%m-%d)" "$(nproc) cores, best of $ROUNDS" "$s_tot" "$s_tr" "$f_tot" "$f_tr" "$o_tot" "$o_tr" \
  "$(echo "$s_tot / $f_tot" | bc -l)" "$(echo "$s_tr / $f_tr" | bc -l)" "$(echo "$s_tot / $o_tot" | bc -l)" "$(echo "$s_tr / $o_tr" | bc -l)")
echo "$line"
echo "(date | machine | as shipped | OMP_NUM_THREADS=1 | otter train, 1 process | shipped / OMP=1 | shipped / 1 process; each: whole job / training)"
if grep -q "^## Ranks sharing a machine" BENCHMARKS.md; then
  echo "$line" >> BENCHMARKS.md
fi
