#!/usr/bin/env bash
# Checkpoint benchmark: `otter bench ckpt` (2 ranks writing their shards in parallel; a
# run's first save, its second (new files), then a later save over the shard files
# retention recycled, phase by phase: blocked while staging, written, durable; a verified
# load) against torch.save / torch.load of the same tensors
# (benches/ckpt_torch.py, PyPI torch), same machine, one run. Three rounds, the sides
# alternating, best of each measure per side: this machine's disk and page-cache timings
# swing by several times from run to run. Appends the results to BENCHMARKS.md.
# Then the blocking in real training: `otter bench train-step --ckpt-dir` on the
# compute-bound benchmark model, saving after every step.
#   scripts/bench-ckpt.sh [MB]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mb="${1:-600}"
bash scripts/setup.sh
py="$(bash scripts/bench-venv.sh)"
cargo build --quiet --release --bin otter
o=(); o1=(); p=()
for round in 1 2 3; do
  o+=("$(target/release/otter bench ckpt --mb "$mb" --params 64 --world 2 --dir out/bench-ckpt)")
  p+=("$("$py" benches/ckpt_torch.py "$mb" 64 out/bench-ckpt-torch)")
  o1+=("$(target/release/otter bench ckpt --mb "$mb" --params 64 --world 1 --dir out/bench-ckpt)")
done
# In real training: the compute-bound benchmark model (47.7M trainable parameters: 573 MB
# of weights + moments) saving after every step; blocking = hand-off + the next update's
# wait for staging (overlapped with that step's forward and backward).
tr=(); tr0=()
for round in 1 2; do
  tr+=("$(target/release/otter bench train-step --model-config benches/configs/compute.json --batch 2 --seq 256 --steps 4 --warmup 1 --ckpt-dir out/bench-ckpt-train)")
  tr0+=("$(target/release/otter bench train-step --model-config benches/configs/compute.json --batch 2 --seq 256 --steps 4 --warmup 1)")
done
printf '%s\n' "${o[@]}" "${o1[@]}" "${p[@]}" "${tr[@]}" "${tr0[@]}" >&2
# best KEY LINES...: the smallest value of KEY=... over the lines
best() { local k=$1; shift; printf '%s\n' "$@" | sed -nE "s/.* $k=([0-9.]+).*/\1/p" | sort -g | head -1; }
all() { local k=$1; shift; printf '%s\n' "$@" | sed -nE "s/.* $k=([0-9.]+).*/\1/p" | paste -sd' '; }
first=$(best first_save_s "${o[@]}"); blocked=$(best blocked_s "${o[@]}"); written=$(best written_s "${o[@]}")
durable=$(best durable_s "${o[@]}"); load=$(best load_s "${o[@]}")
fwritten=$(best fresh_written_s "${o[@]}"); fdurable=$(best fresh_durable_s "${o[@]}")
written1=$(best written_s "${o1[@]}"); durable1=$(best durable_s "${o1[@]}")
tsave=$(best save_s "${p[@]}"); tsavef=$(best save_fsync_s "${p[@]}"); tload=$(best load_s "${p[@]}")
r() { python3 -c "print(f'{$1/$2:.2f}')"; }
tblocked=$(best ckpt_blocked_s "${tr[@]}"); tsync=$(best ckpt_sync_s "${tr[@]}")
tstep=$(best step_s "${tr[@]}"); tstep0=$(best step_s "${tr0[@]}")
{
  echo
  echo "### Checkpoint save/load vs torch.save/torch.load, $(date -u +%Y-%m-%d), $(nproc) cores, $mb MB of weights + AdamW moments (64 x 3 f32 tensors)"
  echo
  echo "Best of 3 alternating rounds per side and measure; every timed save or load starts after a \`sync\` (both sides)."
  echo
  echo "| seconds | otter, 2 ranks | otter, 1 rank | torch.save / torch.load |"
  echo "|---|---|---|---|"
  echo "| save, data written (page cache) | $written | $written1 | $tsave |"
  echo "| save, durable (fsync) | $durable | $durable1 | $tsavef |"
  echo "| a run's second save (new files, none recycled yet): written / durable | $fwritten / $fdurable | | |"
  echo "| staging (what blocked the loop before staging overlapped the next step) | $blocked | | (all of it) |"
  echo "| a run's first save, durable (fresh staging buffers) | $first | | |"
  echo "| load (CRC-32 verified) | $load | | $tload |"
  echo
  echo "Every save after a run's second writes over the shard files retention recycled (keep_last retires a step per save). All rounds, 2 ranks: written $(all written_s "${o[@]}"); durable $(all durable_s "${o[@]}"); new files written $(all fresh_written_s "${o[@]}"). torch.save $(all save_s "${p[@]}"); + fsync $(all save_fsync_s "${p[@]}")."
  echo
  echo "Sharded save with 2 ranks / torch.save, like for like (both until the data is written): **$(r "$written" "$tsave")x**; both durable (fsync): **$(r "$durable" "$tsavef")x**; target at most 0.5x."
  echo "Async save blocking in training (compute-bound benchmark model, 573 MB of state, a save after every step; staging overlaps the next step's forward and backward): **$(r "$tblocked" "$tsync")x** ($tblocked s per save against $tsync s for the same save done synchronously); target at most 0.1x. Step time with those saves $tstep s, without $tstep0 s (the background writer shares the 2 cores)."
  echo "Staging alone, if nothing overlapped it (the bench's 2 ranks): $blocked s, $(r "$blocked" "$durable")x of their synchronous save."
  echo "Load / torch.load: $(r "$load" "$tload")x. Command: \`scripts/bench-ckpt.sh\`."
} | tee -a BENCHMARKS.md
