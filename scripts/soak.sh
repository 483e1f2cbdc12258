#!/usr/bin/env bash
# A long run of the local job (a coordinator and two CPU workers on this machine, the tiny
# model on 1200 synthetic samples, a checkpoint every 200 steps) that samples, every
# INTERVAL seconds, the resident memory of the coordinator and of each rank process and the
# size of the coordinator's saved state; at the end it prints the growth per 1k steps
# after warm-up (from 20% of the steps, and over the second half), absolute and relative
# to the size.
#
#   scripts/soak.sh [--steps N] [--interval S]      (default: 10000 steps, every 2 s)
#   OTTER_BIN_DIR=target/debug scripts/soak.sh ...   (skip the release build)
#
# Release binaries; OMP_NUM_THREADS is left to the ranks (they split the cores).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
STEPS=10000
# Every 2 s: well inside the checkpoint period (200 steps, 10-20 s here). Memory that
# follows the checkpoints (a save's buffers; until issue 50's fix, a rank handing its free
# pages back after each save and faulting them in again) is a sawtooth; sampled at about its
# own period (20 s did), the samples beat against it and the fitted slope moved by +-0.5%
# per 1k steps between runs.
INTERVAL=2
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) STEPS="$2"; shift 2 ;;
    --interval) INTERVAL="$2"; shift 2 ;;
    *) echo "usage: scripts/soak.sh [--steps N] [--interval S]" >&2; exit 2 ;;
  esac
done
bash scripts/setup.sh
# OTTER_BIN_DIR: prebuilt binaries (e.g. target/debug) instead of a release build.
bin="${OTTER_BIN_DIR:-target/release}"
if [ -z "${OTTER_BIN_DIR:-}" ]; then
  cargo build --quiet --release --bins
fi
work=out/soak
rm -rf "$work"
mkdir -p "$work"
$bin/otter data synth --out "$work/synthetic" --samples 1200 --image-px 48 --seed 0 >/dev/null
# A step takes 2 ranks x 2 samples: enough epochs for STEPS steps.
epochs=$(( STEPS * 4 / 1100 + 2 ))
python3 - "$work/job.yaml" "$epochs" "$STEPS" <<'EOF'
import re, sys
y = open("configs/local-job.yaml").read()
y = y.replace("../tests/", "../../tests/").replace("../out/synthetic", "synthetic")
y = re.sub(r"out_dir: \S+", "out_dir: run", y)
y = re.sub(r"epochs: \d+", f"epochs: {sys.argv[2]}\n  max_steps: {sys.argv[3]}", y, count=1)
y = re.sub(r"save_every: \d+", "save_every: 200", y)
y = y.replace("max_nodes: 4", "max_nodes: 2")
open(sys.argv[1], "w").write(y)
EOF
export OTTER_JOIN_TOKEN=soak
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
$bin/otter-coord start --config "$work/job.yaml" --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --state-dir "$work/coord" \
  >"$work/coord.out" 2>"$work/coord.log" &
coord=$!
pids+=("$coord")
addr="" http=""
for _ in $(seq 200); do
  addr=$(sed -nE 's/^otter-coord listening on ([^ ]+).*/\1/p' "$work/coord.out")
  http=$(sed -nE 's/^otter-coord http on ([^ ]+).*/\1/p' "$work/coord.out")
  [ -n "$addr" ] && [ -n "$http" ] && break
  sleep 0.05
done
# Each agent serves its node's metrics on a free port, its rank on the next one: the ranks'
# allocator statistics (live vs held-free heap) tell a leak from fragmentation.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ports=()
for n in a b; do
  p=$(free_port); while ! python3 -c "import socket; s=socket.socket(); s.bind(('0.0.0.0',$p+1))" 2>/dev/null; do p=$(free_port); done
  ports+=("$p")
  $bin/otter-worker join --coord "$addr" --node-id "$n" --cpu-ranks 1 --advertise-host 127.0.0.1 --metrics-port "$p" >"$work/$n.log" 2>&1 &
  pids+=("$!")
done
workers=("${pids[1]}" "${pids[2]}")

# A process that just exited (a zombie) still has a status file, without these lines: 0.
rss_kb() { awk '/^VmRSS/ {v = $2} END {print v + 0}' "/proc/$1/status" 2>/dev/null || echo 0; }
# The anonymous part of RSS: what the process allocated (heap, stacks, its allocator's
# caches). RSS also counts file pages mapped in (the binary, libtorch's 300+ MB of code and
# data), which grow as code paths first run and shrink when the kernel reclaims page cache
# under memory pressure (a build beside the soak took 45 MB off each rank): a leak or
# fragmentation shows in the anonymous part.
anon_kb() { awk '/^RssAnon/ {v = $2} END {print v + 0}' "/proc/$1/status" 2>/dev/null || echo 0; }
rank_of() { pgrep -P "$1" -f "otter-worker rank" | head -n 1; }
# One scrape of a /metrics page: the value of the first series matching an awk pattern.
metric() { curl -s --max-time 5 "http://$1/metrics" 2>/dev/null | awk "$2"' { print int($NF); found = 1; exit } END { if (!found) print 0 }'; }
committed() { metric "$http" '/^otter_committed_step /'; }
# In-use heap (KB) from a /metrics page (otter_process_heap_bytes{kind="in_use"}).
heap_kb() { echo $(( $(metric "$1" '/^otter_process_heap_bytes/ && /kind="in_use"/') / 1024 )); }
samples="$work/samples.tsv"
printf 'seconds\tsteps\tcoord_kb\trank_a_kb\trank_b_kb\tstate_bytes\tcoord_heap_kb\trank_a_heap_kb\trank_b_heap_kb\tcoord_anon_kb\trank_a_anon_kb\trank_b_anon_kb\n' | tee "$samples"
start=$(date +%s)
while kill -0 "$coord" 2>/dev/null; do
  sleep "$INTERVAL"
  kill -0 "$coord" 2>/dev/null || break
  ra=$(rank_of "${workers[0]}" || true); rb=$(rank_of "${workers[1]}" || true)
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(( $(date +%s) - start ))" "$(committed)" "$(rss_kb "$coord")" \
    "$(rss_kb "${ra:-0}")" "$(rss_kb "${rb:-0}")" "$(stat -c %s "$work/coord/state.json" 2>/dev/null || echo 0)" \
    "$(heap_kb "$http")" "$(heap_kb "127.0.0.1:$(( ports[0] + 1 ))")" "$(heap_kb "127.0.0.1:$(( ports[1] + 1 ))")" \
    "$(anon_kb "$coord")" "$(anon_kb "${ra:-0}")" "$(anon_kb "${rb:-0}")" | tee -a "$samples"
done
wait "$coord" || true
tail -n 1 "$work/coord.out"
python3 - "$samples" <<'EOF'
import sys
rows = [[int(x or 0) for x in l.split("\t")] for l in open(sys.argv[1]).read().splitlines()[1:] if l.strip()]
rows = [r for r in rows if r[1] > 0 and all(x > 0 for x in r[2:5] + r[9:12])]
if len(rows) < 4:
    sys.exit("too few samples (a longer --steps or a shorter --interval)")
def slope(xs, ys):  # least squares: units per step
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1e-9)
def robust_slope(xs, ys):  # Theil-Sen: the median of the slopes between every two samples
    s = sorted((ys[j] - ys[i]) / (xs[j] - xs[i]) for i in range(len(xs)) for j in range(i + 1, len(xs)) if xs[j] != xs[i])
    return s[len(s) // 2] if s else 0.0
# The growth is the Theil-Sen slope (the median of the slopes between every two samples):
# a process's resident memory has short spikes (a save's buffers, the coordinator's heap
# between two of its releases) that least squares weighs by where they happen to land
# among ~100 samples; the median slope follows the level the process returns to. Least
# squares is printed beside it.
# Two readings of "after warm-up". From 20% of the steps (caches, the history window), and
# the second half: a process's resident memory is its allocator's high-water mark, which
# steps up when the largest batch meets a checkpoint's staging or a save's buffers and then
# stays; such steps thin out but can land after 20%. A leak grows at the same rate in
# the second half; a high-water mark settling does not.
for frac, label in [(0.2, "from 20% of the steps"), (0.5, "second half")]:
    after = [r for r in rows if r[1] >= rows[-1][1] * frac]
    steps = [r[1] for r in after]
    print(f"after warm-up, {label}: {len(after)} samples, steps {steps[0]}..{steps[-1]}")
    for i, name in [(9, "coordinator RssAnon"), (10, "rank a RssAnon"), (11, "rank b RssAnon"), (2, "coordinator RSS"), (3, "rank a RSS"), (4, "rank b RSS"),
                    (6, "coordinator heap in use"), (7, "rank a heap in use"), (8, "rank b heap in use")]:
        ys = [r[i] for r in after]
        g = slope(steps, ys) * 1000
        r = robust_slope(steps, ys) * 1000
        if ys[-1] <= 0:
            continue  # not reported (no allocator statistics)
        print(f"  {name}: {ys[0]} -> {ys[-1]} KB; growth {r:+.1f} KB per 1k steps ({100 * r / ys[-1]:+.3f}% of its size); "
              f"least squares {g:+.1f} KB ({100 * g / ys[-1]:+.3f}%)")
after = [r for r in rows if r[1] >= rows[-1][1] * 0.2]
steps = [r[1] for r in after]
st = [r[5] for r in after]
print(f"state.json: between {min(st)} and {max(st)} bytes (it holds the steps since the oldest kept checkpoint: a sawtooth); "
      f"growth {slope(steps, st) * 1000:+.0f} bytes per 1k steps")
EOF
