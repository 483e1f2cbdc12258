#!/usr/bin/env bash
# Creates (idempotently) the benchmark peers' venv: the same torch as the build venv plus
# the PyPI peers, kept apart so their requirements can never replace the torch that tch
# binds. Prints the venv's python. Usage: py=$(scripts/bench-venv.sh)
set -euo pipefail
CACHE="${OTTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/otter}"
BV="$CACHE/bench-venv"
reqs=("torch==2.13.0" "numpy" "pillow" "tokenizers" "einops" "einops-exts" "transformers>=4.40,<5")
stamp="$BV/.otter-stamp"
want="$(printf '%s\n' "${reqs[@]}") open-flamingo==2.0.1 (no deps)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[bench-venv] creating $BV (once)" >&2
  python3 -m venv "$BV"
  "$BV/bin/pip" install -q --disable-pip-version-check "${reqs[@]}" >&2
  # open-flamingo pins torch==2.0.1 and pulls open_clip; the benchmark builds Flamingo
  # from local modules and imports only open_flamingo.src.flamingo, so take it alone.
  "$BV/bin/pip" install -q --disable-pip-version-check --no-deps open-flamingo==2.0.1 >&2
  printf '%s' "$want" > "$stamp"
fi
echo "$BV/bin/python"
