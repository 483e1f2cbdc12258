#!/usr/bin/env bash
# All-reduce benchmark: `otter bench allreduce` (our CPU ring; shared memory between
# same-host ranks, and with OTTER_RING_SHM=0 the plain TCP ring) against
# torch.distributed Gloo (benches/allreduce_gloo.py, the PyPI torch wheel), same machine,
# same sizes, one run; and the deterministic reduction (`--exact`: exact i64 limbs over the
# TCP ring, bandwidth of the f32 data). Appends the bus-bandwidth ratios to BENCHMARKS.md.
#   scripts/bench-allreduce.sh [SIZES_MB] [ITERS]      (default 1,16,64 and 10)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
sizes="${1:-1,16,64}"; iters="${2:-10}"
bash scripts/setup.sh
py="$(bash scripts/bench-venv.sh)"
cargo build --quiet --release --bin otter
busbw() { sed -nE "s/.*size_mb=$1 .*busbw=([0-9.]+).*/\1/p" <<<"$2"; }
rows=()
for world in 2 4; do
  ours=$(target/release/otter bench allreduce --world "$world" --size-mb "$sizes" --iters "$iters")
  tcp=$(OTTER_RING_SHM=0 target/release/otter bench allreduce --world "$world" --size-mb "$sizes" --iters "$iters")
  exact=$(target/release/otter bench allreduce --world "$world" --size-mb "$sizes" --iters "$iters" --exact)
  gloo=$("$py" benches/allreduce_gloo.py "$world" "$sizes" "$iters" 2>/dev/null)
  printf 'otter (shm):\n%s\notter (tcp):\n%s\notter (exact):\n%s\ngloo:\n%s\n' "$ours" "$tcp" "$exact" "$gloo" >&2
  for mb in ${sizes//,/ }; do
    o=$(busbw "$mb" "$ours"); t=$(busbw "$mb" "$tcp"); e=$(busbw "$mb" "$exact"); g=$(busbw "$mb" "$gloo")
    rows+=("| $world | $mb | $o | $t | $e | $g | **$(python3 -c "print(f'{$o/$g:.2f}')")x** | $(python3 -c "print(f'{$t/$g:.2f}')")x | $(python3 -c "print(f'{$e/$o:.2f}')")x |")
  done
done
{
  echo
  echo "### All-reduce (mean, f32) vs torch.distributed Gloo, $(date -u +%Y-%m-%d), $(nproc) cores, local ranks"
  echo
  echo "| ranks | MB | otter busbw GB/s (shm) | otter busbw GB/s (TCP ring) | deterministic (exact) busbw GB/s | Gloo busbw GB/s | ratio shm/Gloo | ratio TCP/Gloo | ratio exact/shm |"
  echo "|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo
  echo "busbw = algbw * 2(n-1)/n (nccl-tests). Target: at least 2x Gloo at 64 MB for 2 and 4 ranks. Command: \`scripts/bench-allreduce.sh\`."
} | tee -a BENCHMARKS.md
