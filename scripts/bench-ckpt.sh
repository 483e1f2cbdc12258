#!/usr/bin/env bash
# Checkpoint benchmark: `otter bench ckpt` (2 ranks writing their shards in parallel,
# fsynced; the blocking part of an async save; a verified load) against torch.save /
# torch.load of the same tensors (benches/ckpt_torch.py, PyPI torch), same machine, one
# run. Appends the results to BENCHMARKS.md.     scripts/bench-ckpt.sh [MB]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mb="${1:-600}"
bash scripts/setup.sh
py="$(bash scripts/bench-venv.sh)"
cargo build --quiet --release --bin otter
o=$(target/release/otter bench ckpt --mb "$mb" --params 64 --world 2 --dir out/bench-ckpt)
o1=$(target/release/otter bench ckpt --mb "$mb" --params 64 --world 1 --dir out/bench-ckpt)
p=$("$py" benches/ckpt_torch.py "$mb" 64 out/bench-ckpt-torch)
printf '%s\n%s\n%s\n' "$o" "$o1" "$p" >&2
get() { sed -nE "s/.* $1=([0-9.]+).*/\1/p" <<<"$2"; }
save=$(get save_s "$o"); blocked=$(get blocked_s "$o"); blocked1=$(get blocked_first_s "$o"); load=$(get load_s "$o"); save1=$(get save_s "$o1")
tsave=$(get save_s "$p"); tsavef=$(get save_fsync_s "$p"); tload=$(get load_s "$p")
r() { python3 -c "print(f'{$1/$2:.2f}')"; }
{
  echo
  echo "### Checkpoint save/load vs torch.save/torch.load, $(date -u +%Y-%m-%d), $(nproc) cores, $mb MB of weights + AdamW moments (64 x 3 f32 tensors)"
  echo
  echo "| | otter, 2 ranks | otter, 1 rank | torch.save (no fsync) | torch.save + fsync |"
  echo "|---|---|---|---|---|"
  echo "| save (s) | $save | $save1 | $tsave | $tsavef |"
  echo "| load (s) | $load | | $tload | |"
  echo
  echo "Sharded save with 2 ranks / torch.save: **$(r "$save" "$tsave")x** (vs torch.save + fsync: $(r "$save" "$tsavef")x); target at most 0.5x."
  echo "Async save blocking (staging rank 0's share to host memory, buffers reused from the previous save: every save but a run's first) / synchronous save: **$(r "$blocked" "$save")x** ($blocked s); target at most 0.1x. A run's first save, allocating its buffers: $(r "$blocked1" "$save")x ($blocked1 s)."
  echo "Load (verified CRC-32) / torch.load: $(r "$load" "$tload")x. Command: \`scripts/bench-ckpt.sh\`."
} | tee -a BENCHMARKS.md
