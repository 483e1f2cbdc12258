#!/usr/bin/env bash
# Builds the GPU test binaries (and otter-worker, otter, otter-coord, which the
# worker-level check runs) for a machine that has a GPU and a PyTorch install but no
# Rust toolchain or network: links them against the *target's* torch version (from PyPI,
# cached in its own venv) and strips them. Run there with
#   LD_LIBRARY_PATH=<its site-packages>/torch/lib OTTER_GPU_BINS=DIR scripts/gpu-check.sh
#
#   scripts/build-gpu-bins.sh 2.11.0 .gpu-bins
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
version="${1:?torch version of the target machine}"
out="${2:?output dir}"
CACHE="${OTTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/otter}"
venv="$CACHE/venv-torch-$version"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "torch==$version"
fi
site0="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if [ -d "$site0/nvidia/cu13" ] && [ ! -e "$site0/nvidia/cu13/include/crt" ]; then
  # CUDA 13 wheels lack crt/ and cccl headers that c10d's NCCL headers include.
  "$venv/bin/pip" install -q --disable-pip-version-check "nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*" || true
fi
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
# Each tch release binds exactly one libtorch version: build a scratch copy of the tree
# with the tch matching the target's torch.
case "$version" in
  2.13.*) tch=0.26.0 ;;
  2.12.*) tch=0.25.0 ;;
  2.11.*) tch=0.24.0 ;;
  2.10.*) tch=0.23.0 ;;
  *) echo "no known tch release for torch $version" >&2; exit 2 ;;
esac
src="$CACHE/src-torch-$version"
mkdir -p "$src"
tar --exclude=./target --exclude=./.git --exclude=./.gpu-bins -cf - . | tar -xf - -C "$src"
sed -i -E -e "s/^(tch|torch-sys) = \{ version = \"=[0-9.]+\"/\1 = { version = \"=$tch\"/" \
  -e "s/^(tch|torch-sys) = \"=[0-9.]+\"/\1 = \"=$tch\"/" "$src/Cargo.toml"
grep -q "^tch = .*=$tch" "$src/Cargo.toml" || { echo "could not pin tch $tch in $src/Cargo.toml" >&2; exit 2; }
rm -f "$src/Cargo.lock"
cd "$src"
export LIBTORCH="$site/torch" OTTER_TORCH_SITE="$site" CARGO_TARGET_DIR="$CACHE/target-torch-$version"
export CARGO_PROFILE_DEV_DEBUG=0
mkdir -p "$CARGO_TARGET_DIR"
# With the NCCL backend when the target wheel's NCCL/CUDA headers are there (CUDA 13
# wheels need nvidia-cuda-crt/cccl too); otherwise without it, said out loud.
features=--features=nccl
if ! cargo test --no-run $features --test gpu --quiet >/dev/null 2>&1; then
  echo "WARNING: the nccl feature does not build against torch $version's wheel; GPU binaries without NCCL" >&2
  features=
fi
cargo test --no-run $features --test gpu --message-format=json \
  | python3 -c 'import sys,json
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]=="gpu": print(m["executable"])' \
  > "$CARGO_TARGET_DIR/gpu-bins.txt"
# The worker-level check runs a real job: the binaries come along (OTTER_GPU_BINS).
cargo build $features --bin otter-worker --bin otter --quiet
cargo build -p otter-core --bin otter-coord --quiet
for b in otter-worker otter otter-coord; do echo "$CARGO_TARGET_DIR/debug/$b"; done >> "$CARGO_TARGET_DIR/gpu-bins.txt"
cd - >/dev/null
mkdir -p "$out"
while read -r exe; do
  cp "$exe" "$out/"
  strip "$out/$(basename "$exe")"
done < "$CARGO_TARGET_DIR/gpu-bins.txt"
# The training binaries link TCMalloc (build.rs): it comes along, for a machine that may
# not have Debian's libtcmalloc-minimal4 (gpu-check.sh puts DIR on LD_LIBRARY_PATH).
cp -L /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 "$out/"
ls -la "$out"
