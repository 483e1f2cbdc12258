#!/usr/bin/env bash
# Training-step benchmark: `otter bench train-step` (Rust, tch) against open-flamingo's
# Flamingo in PyTorch eager (benches/train_step.py), same model dimensions, batch and
# sequence, same machine, one run; for a tiny config and one where compute dominates.
# Appends the ratios to BENCHMARKS.md.   scripts/bench-train.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
py="$(bash scripts/bench-venv.sh)"
cargo build --quiet --release --bin otter
rows=()
run() { # name config batch seq steps warmup
  local r p
  r=$(target/release/otter bench train-step --model-config "$2" --batch "$3" --seq "$4" --steps "$5" --warmup "$6")
  p=$("$py" benches/train_step.py "$2" "$3" "$4" "$5" "$6" 2>/dev/null)
  echo "$r"; echo "$p"
  local rs ps
  rs=$(sed -E 's/.*step_s=([0-9.]+).*/\1/' <<<"$r"); ps=$(sed -E 's/.*step_s=([0-9.]+).*/\1/' <<<"$p")
  local params; params=$(sed -E 's/.* params=([0-9]+) .*/\1/' <<<"$r")
  rows+=("| $1 | $params | $3 x $4 | $(python3 -c "print(f'{$rs*1000:.1f}')") | $(python3 -c "print(f'{$ps*1000:.1f}')") | **$(python3 -c "print(f'{$rs/$ps:.2f}')")x** |")
}
run tiny benches/configs/tiny.json 2 64 20 3
run compute benches/configs/compute.json 2 256 3 1
{
  echo
  echo "### Training step vs PyTorch eager (open-flamingo Flamingo), $(date -u +%Y-%m-%d), $(nproc) cores, CPU, f32"
  echo
  echo "| config | params | batch x seq | otter ms/step | PyTorch ms/step | ratio (lower is better) |"
  echo "|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo
  echo "Target: at most 0.8x PyTorch's step time. Command: \`scripts/bench-train.sh\`."
} | tee -a BENCHMARKS.md
