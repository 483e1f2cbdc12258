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
# best KEY LINES...: the smallest value of KEY=... over the lines
best() { local k=$1; shift; printf '%s\n' "$@" | sed -nE "s/.* $k=([0-9.]+).*/\1/p" | sort -g | head -1; }
ms() { python3 -c "print(f'{$1*1000:.1f}')"; }
run() { # name config batch seq steps warmup
  # Three rounds, the sides alternating; best of each (this machine's timings swing by
  # 20% and more from minute to minute). `mkl`: our step with libtorch's default f32 GEMM
  # (OTTER_CPU_GEMM=mkl), to show what the oneDNN linear layers contribute.
  local o=() m=() p=() a=("$2" "$3" "$4" "$5" "$6")
  for _ in 1 2 3; do
    o+=("$(target/release/otter bench train-step --model-config "$2" --batch "$3" --seq "$4" --steps "$5" --warmup "$6")")
    p+=("$("$py" benches/train_step.py "${a[@]}" 2>/dev/null)")
    m+=("$(OTTER_CPU_GEMM=mkl target/release/otter bench train-step --model-config "$2" --batch "$3" --seq "$4" --steps "$5" --warmup "$6")")
  done
  printf '%s\n' "${o[@]}" "${m[@]}" "${p[@]}" >&2
  local rs ms_ ps ro po params
  rs=$(best step_s "${o[@]}"); ms_=$(best step_s "${m[@]}"); ps=$(best step_s "${p[@]}")
  ro=$(best opt_s "${o[@]}"); po=$(best opt_s "${p[@]}")
  params=$(sed -E 's/.* params=([0-9]+) .*/\1/' <<<"${o[0]}")
  rows+=("| $1 | $params | $3 x $4 | $(ms "$rs") | $(ms "$ms_") | $(ms "$ps") | $(ms "$ro") / $(ms "$po") | **$(python3 -c "print(f'{$rs/$ps:.2f}')")x** |")
}
run tiny benches/configs/tiny.json 2 64 100 5
run compute benches/configs/compute.json 2 256 3 1
{
  echo
  echo "### Training step vs PyTorch eager (open-flamingo Flamingo), $(date -u +%Y-%m-%d), $(nproc) cores, CPU, f32"
  echo
  echo "Best of 3 alternating rounds per side."
  echo
  echo "| config | params | batch x seq | otter ms/step | otter, MKL GEMM | PyTorch ms/step | optimizer ms, otter / PyTorch | ratio (lower is better) |"
  echo "|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo
  echo "Target: at most 0.8x PyTorch's step time. Command: \`scripts/bench-train.sh\`."
} | tee -a BENCHMARKS.md
