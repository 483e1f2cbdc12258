#!/usr/bin/env bash
# Builds the container images (scripts/build-images.sh) and runs a real job in them, the
# way the Kubernetes manifests (cluster/base, cluster/overlays/cpu-demo) run it:
#
#   * the coordinator from otter-coord:dev, two CPU workers (one rank each) from
#     otter-worker:dev, each in its own container (`buildah run --isolation chroot`, host
#     network: `podman run` needs cgroups this kind of machine does not give it);
#   * as uid:gid 10001:10001 (the manifests' runAsUser/runAsGroup), with the manifests'
#     mounts: the job (cluster/overlays/cpu-demo/job.yaml) at /etc/otter/job.yaml, the
#     join token (mode 0440, group 10001) at /var/run/secrets/otter/token, /models
#     (read-only; the tiny Otter of tests/fixtures/tiny_otter), /data (read-only; a
#     synthetic dataset written by the worker image's own `otter data synth`),
#     /checkpoints (read-write), the coordinator's state volume at /var/lib/otter/coord
#     and a scratch /tmp per container. The writable volumes are owned by root with group
#     10001 (setgid, g+rwx): what fsGroup: 10001 gives a pod;
#   * checks: the job finishes with the exactly-once check ok, the final weights and a
#     committed checkpoint are on /checkpoints, the workers' and the coordinator's
#     /healthz answer (the readiness probes), nothing was written to the containers' root
#     filesystems (readOnlyRootFilesystem), `ldd` finds every library of otter-worker,
#     otter and libtorch_cuda.so in the worker image (libcuda.so.1, the GPU driver's, is
#     the one library allowed to be missing: no GPU here) with and without its
#     LD_LIBRARY_PATH (the rpath alone), the NCCL shim links (libtorch_cuda and
#     libnccl resolved for otter-worker), the distroless coordinator image's own loader
#     resolves otter-coord, and that image holds no libtorch, no shell, no package manager;
#   * prints each image's size, the build and job times.
#
# Its own command (not part of scripts/test.sh). Cost on the 2-core development machine
# (measured, see README "Deploy on Kubernetes"): a first run about 35 min (two release
# builds, the 4.7 GB torch wheel set from PyPI) leaving about 13 GB in
# /var/lib/containers and /var/tmp/buildah-cache (stand-in bases, the images, the build
# stages' layer cache, the cargo cache mounts), and about 16 GB more free needed while
# the worker image commits its venv layer; a run from a fresh clone with the caches
# warm, 6 min. `OTTER_IMAGES_PRUNE=1` removes the intermediate build-stage images
# afterwards (the venv stage's 5 GB among them: the next build installs the wheels again).
# `OTTER_IMAGES_SKIP_BUILD=1` tests the images already built.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COORD_IMAGE="${OTTER_COORD_IMAGE:-otter-coord:dev}"
WORKER_IMAGE="${OTTER_WORKER_IMAGE:-otter-worker:dev}"
JOB_TIMEOUT="${OTTER_IMAGES_JOB_TIMEOUT:-900}"
export OTTER_BUILDER=buildah   # the job runs with `buildah run`
UID_GID=10001:10001
VENV_LIB=/opt/venv/lib/python3.11/site-packages

log() { echo "[test-images] $*" >&2; }
failures=()
pass() { echo "PASS $*"; }
fail() { echo "FAIL $*"; failures+=("$*"); }
t_start=$(date +%s)

# --- build -------------------------------------------------------------------------------
build_s=()
if [ -z "${OTTER_IMAGES_SKIP_BUILD:-}" ]; then
  for what in coordinator worker; do
    t0=$(date +%s)
    bash "$ROOT/scripts/build-images.sh" "$what"
    build_s+=("$what $(($(date +%s) - t0)) s")
  done
else
  command -v buildah >/dev/null || { log "OTTER_IMAGES_SKIP_BUILD: buildah is not installed"; exit 1; }
fi
for img in "$COORD_IMAGE" "$WORKER_IMAGE"; do
  buildah inspect --type image "$img" >/dev/null 2>&1 || { log "no image $img"; exit 1; }
done

# --- the job's volumes ---------------------------------------------------------------------
W="$(mktemp -d "${TMPDIR:-/var/tmp}/otter-images.XXXXXX")"
chmod 0755 "$W"
ctrs=()
pgids=()
cleanup() {
  local p c
  for p in "${pgids[@]}"; do kill -TERM -- "-$p" 2>/dev/null || true; done
  sleep 1
  for p in "${pgids[@]}"; do kill -KILL -- "-$p" 2>/dev/null || true; done
  for c in "${ctrs[@]}"; do buildah umount "$c" >/dev/null 2>&1 || true; buildah rm "$c" >/dev/null 2>&1 || true; done
  if [ -n "${OTTER_IMAGES_KEEP:-}" ]; then log "kept $W"; else rm -rf "$W"; fi
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

# A volume as a pod with fsGroup 10001 sees it: root-owned, group 10001, setgid, g+rwx.
vol() { mkdir -p "$1"; chown 0:10001 "$1"; chmod 2775 "$1"; }
mkdir -p "$W/etc" "$W/secret" "$W/models" "$W/data"
cp "$ROOT/cluster/overlays/cpu-demo/job.yaml" "$W/etc/job.yaml"
od -An -tx1 -N16 /dev/urandom | tr -d ' \n' > "$W/secret/token"
chown 0:10001 "$W/secret/token"; chmod 0440 "$W/secret/token"   # the Secret's defaultMode 0440
cp -r "$ROOT/tests/fixtures/tiny_otter" "$W/models/tiny_otter"
chmod -R a+rX "$W/models" "$W/etc"
vol "$W/data"; vol "$W/checkpoints"; vol "$W/state"
for t in coord w0 w1 synth; do mkdir -p "$W/tmp-$t"; chmod 1777 "$W/tmp-$t"; done

new_ctr() {  # VAR IMAGE NAME: a working container in VAR (created here, removed at exit)
  local c
  c="$(buildah from --pull=false --quiet --name "$3-$$" "$2")"
  ctrs+=("$c")
  printf -v "$1" '%s' "$c"
}
RUN=(buildah run --isolation chroot --network host --user "$UID_GID")
# The token at /var/run/secrets/otter, where the manifests mount it. /var/run is a symlink
# to /run in both images; `buildah run -v` does not resolve a symlink in the destination
# inside the image (it would follow it on the host), so the mount goes to the resolved
# path. The programs are given /var/run/secrets/otter/token, as in the manifests.
secret_dst() {  # CONTAINER
  local m t
  m="$(buildah mount "$1")"
  t="$(readlink "$m/var/run" || true)"
  buildah umount "$1" >/dev/null
  case "$t" in /run|../run|/run/) echo /run/secrets/otter ;; "") echo /var/run/secrets/otter ;; *) log "/var/run -> $t: unexpected"; exit 1 ;; esac
}

new_ctr cctr "$COORD_IMAGE" otter-test-coord
new_ctr wctr0 "$WORKER_IMAGE" otter-test-worker-0
new_ctr wctr1 "$WORKER_IMAGE" otter-test-worker-1
COMMON_MOUNTS=(-v "$W/secret:$(secret_dst "$wctr0"):ro" -v "$W/models:/models:ro" -v "$W/checkpoints:/checkpoints")

# The data: written by the worker image's `otter` (as the job's comment says), /data
# read-write for this one step only.
new_ctr sctr "$WORKER_IMAGE" otter-test-synth
if "${RUN[@]}" -v "$W/data:/data" -v "$W/tmp-synth:/tmp" "$sctr" -- \
     otter data synth --out /data/synthetic --samples 64 --image-px 48 --seed 0 > "$W/synth.log" 2>&1; then
  pass "otter data synth in $WORKER_IMAGE as $UID_GID wrote /data/synthetic ($(ls "$W/data/synthetic" | wc -l) files)"
else
  cat "$W/synth.log" >&2; fail "otter data synth in $WORKER_IMAGE"
fi
if "${RUN[@]}" -v "$W/etc:/etc/otter:ro" -v "$W/models:/models:ro" -v "$W/data:/data:ro" -v "$W/tmp-synth:/tmp" "$sctr" -- \
     otter data validate --config /etc/otter/job.yaml > "$W/validate.log" 2>&1; then
  pass "otter data validate: cluster/overlays/cpu-demo/job.yaml's paths resolve on the mounted volumes"
else
  cat "$W/validate.log" >&2; fail "otter data validate --config /etc/otter/job.yaml"
fi

# --- the job -------------------------------------------------------------------------------
# Each `buildah run` in a session (process group) of its own (setsid), so that cleanup
# ends exactly the processes this script started.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

t_job=$(date +%s)
set -- "${RUN[@]}" --env RUST_LOG=info -v "$W/etc:/etc/otter:ro" -v "$W/secret:$(secret_dst "$cctr"):ro" \
  -v "$W/state:/var/lib/otter/coord" -v "$W/models:/models:ro" -v "$W/data:/data:ro" \
  -v "$W/checkpoints:/checkpoints" -v "$W/tmp-coord:/tmp" "$cctr" -- \
  /usr/local/bin/otter-coord start --config /etc/otter/job.yaml --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 \
  --state-dir /var/lib/otter/coord --token-file /var/run/secrets/otter/token
setsid "$@" > "$W/coord.out" 2> "$W/coord.log" < /dev/null &
coord_pid=$!
pgids+=("$coord_pid")
addr=""
for _ in $(seq 300); do
  addr=$(sed -nE 's/^otter-coord listening on ([^ ]+).*/\1/p' "$W/coord.out")
  [ -n "$addr" ] && break
  kill -0 "$coord_pid" 2>/dev/null || break
  sleep 0.2
done
http=$(sed -nE 's/^otter-coord http on ([^ ]+).*/\1/p' "$W/coord.out")
if [ -z "$addr" ]; then
  cat "$W/coord.out" "$W/coord.log" >&2
  fail "otter-coord did not start in $COORD_IMAGE"
else
  pass "otter-coord (image $COORD_IMAGE, user $UID_GID) listening on $addr, http on $http"
  wpids=()
  mports=()
  for i in 0 1; do
    ctr_var="wctr$i"
    mp=$(free_port)
    mports+=("$mp")
    setsid "${RUN[@]}" --env RUST_LOG=info "${COMMON_MOUNTS[@]}" -v "$W/data:/data:ro" -v "$W/tmp-w$i:/tmp" "${!ctr_var}" -- \
      /usr/local/bin/otter-worker join --coord "$addr" --node-id "otter-worker-$i" --advertise-host 127.0.0.1 \
      --token-file /var/run/secrets/otter/token --metrics-port "$mp" --cpu-ranks 1 \
      > "$W/worker-$i.log" 2>&1 < /dev/null &
    wpids+=("$!")
    pgids+=("$!")
  done
  # The readiness probes: the agents' /healthz once they have joined; the coordinator's.
  ready=()
  for _ in $(seq 600); do
    ready=()
    for i in 0 1; do
      python3 -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:${mports[$i]}/healthz', timeout=1).status != 200)" 2>/dev/null && ready+=("$i")
    done
    ((${#ready[@]} == 2)) && break
    kill -0 "$coord_pid" 2>/dev/null || break
    sleep 0.2
  done
  if ((${#ready[@]} == 2)); then pass "both workers' /healthz answer 200 (metrics ports ${mports[*]})"
  else fail "workers' /healthz: only ${ready[*]:-none} of 0 1 answered"; fi
  if [ -n "$http" ] && python3 -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://$http/healthz', timeout=2).status != 200)" 2>/dev/null; then
    pass "otter-coord /healthz answers 200"
  elif kill -0 "$coord_pid" 2>/dev/null; then
    fail "otter-coord /healthz at $http"
  fi
  # The job.
  coord_rc=""
  for _ in $(seq $((JOB_TIMEOUT * 5))); do
    kill -0 "$coord_pid" 2>/dev/null || break
    sleep 0.2
  done
  if kill -0 "$coord_pid" 2>/dev/null; then
    fail "the job did not finish within ${JOB_TIMEOUT}s"
  else
    wait "$coord_pid" && coord_rc=0 || coord_rc=$?
  fi
  job_s=$(($(date +%s) - t_job))
  for p in "${wpids[@]}"; do
    for _ in $(seq 150); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
  done
  summary="$(grep -E '^job ' "$W/coord.out" | tail -n 1 || true)"
  echo "coordinator: $summary"
  if [ "$coord_rc" = 0 ] && grep -q "exactly-once check: ok" <<< "$summary" \
     && python3 -c "import json,sys; s=json.load(open(sys.argv[1])); sys.exit(0 if 'Ok' in s['exactly_once'] else 1)" "$W/state/status.json" 2>/dev/null; then
    pass "the job finished in ${job_s}s (coordinator exit 0), exactly-once check ok (summary line and status.json on the state volume)"
  else
    tail -n 30 "$W/coord.log" >&2
    for i in 0 1; do tail -n 20 "$W/worker-$i.log" >&2; done
    fail "the job: coordinator exit ${coord_rc:-?}, summary '$summary'"
  fi
  out="$W/checkpoints/cpu-demo"
  if [ -s "$out/final_weights.safetensors" ] && ls -d "$out"/checkpoints/step-* >/dev/null 2>&1; then
    pass "/checkpoints/cpu-demo: final_weights.safetensors and $(ls -d "$out"/checkpoints/step-* | wc -l) checkpoint(s), owned by uid $(stat -c %u "$out/final_weights.safetensors")"
  else
    ls -lR "$out" >&2 2>/dev/null || true
    fail "no final weights or checkpoints under /checkpoints/cpu-demo"
  fi
  for i in 0 1; do
    if kill -0 "${wpids[$i]}" 2>/dev/null; then fail "worker $i still running after the job ended"; fi
  done
fi

# readOnlyRootFilesystem: nothing in the containers' writable layers but the mount points
# and the files buildah itself provides (/etc/hosts, /etc/resolv.conf, ...).
for c in "$cctr" "$wctr0" "$wctr1"; do
  mnt="$(buildah mount "$c")"
  upper="$(dirname "$mnt")/diff"
  if [ -d "$upper" ]; then
    written="$(cd "$upper" && find . -mindepth 1 \( -type f -o -type l \) ! -path ./etc/hosts ! -path ./etc/resolv.conf ! -path ./etc/hostname ! -path ./run/.containerenv -print | head -n 20)"
    if [ -z "$written" ]; then pass "$(buildah inspect --format '{{.FromImage}}' "$c"): the job wrote nothing to the root filesystem"
    else fail "$(buildah inspect --format '{{.FromImage}}' "$c"): files written outside the volumes: $(tr '\n' ' ' <<< "$written")"; fi
  fi
  buildah umount "$c" >/dev/null
done

# --- libraries -------------------------------------------------------------------------------
# ldd's "not found" lines, but libcuda.so.1 (the driver's, mounted into GPU pods by the
# NVIDIA container runtime; no GPU here).
missing() { { grep 'not found' || true; } | { grep -v '^\s*libcuda\.so\.1 ' || true; } | sed 's/^\s*//' | sort -u | tr '\n' ' '; }
for f in /usr/local/bin/otter-worker /usr/local/bin/otter "$VENV_LIB/torch/lib/libtorch_cuda.so"; do
  for how in image-env rpath-only; do
    if [ "$how" = image-env ]; then env_args=(); else env_args=(env -u LD_LIBRARY_PATH); fi
    lout="$("${RUN[@]}" "$wctr0" -- "${env_args[@]}" ldd "$f" 2>&1)" || true
    m="$(missing <<< "$lout")"
    cuda=""; grep -q 'libcuda\.so\.1 => not found' <<< "$lout" && cuda=" (libcuda.so.1, the driver's, absent as expected)"
    if [ -z "$m" ] && grep -q '=>' <<< "$lout"; then pass "ldd $f ($how): $(grep -c '=>' <<< "$lout") libraries, none missing$cuda"
    else fail "ldd $f ($how): missing $m"; fi
  done
done
lw="$("${RUN[@]}" "$wctr0" -- ldd /usr/local/bin/otter-worker 2>&1 || true)"
if grep -q "libtorch_cuda.so => $VENV_LIB/torch/lib/" <<< "$lw" \
   && grep -Eq "libnccl\.so\.2 => $VENV_LIB/(torch/lib/\.\./\.\./)?nvidia/nccl/lib/" <<< "$lw"; then
  pass "otter-worker (--features nccl) resolves libtorch_cuda.so and libnccl.so.2 in the venv"
else
  fail "otter-worker does not resolve libtorch_cuda/libnccl from $VENV_LIB"
fi
# The NCCL shim (src/comm/nccl_shim.cpp) is a static library inside the binary; its
# c10d::ProcessGroupNCCL references must bind against libtorch_cuda at load time.
if "${RUN[@]}" "$wctr0" -- env LD_BIND_NOW=1 /usr/local/bin/otter-worker --version > /dev/null 2>&1 \
   && "${RUN[@]}" "$wctr0" -- env LD_BIND_NOW=1 /usr/local/bin/otter --version > /dev/null 2>&1; then
  pass "otter-worker and otter start with LD_BIND_NOW=1: every symbol binds, the NCCL shim's c10d::ProcessGroupNCCL included"
else fail "otter-worker/otter do not start with LD_BIND_NOW=1 (an unresolved symbol)"; fi
if command -v nm >/dev/null; then
  wmnt="$(buildah mount "$wctr0")"
  n="$(nm "$wmnt/usr/local/bin/otter-worker" 2>/dev/null | grep -c ' T otter_nccl_' || true)"
  buildah umount "$wctr0" >/dev/null
  if ((n > 0)); then pass "the NCCL shim is linked into otter-worker ($n otter_nccl_* functions)"; else fail "no otter_nccl_* function in otter-worker"; fi
fi
if "${RUN[@]}" "$wctr0" -- /opt/venv/bin/python -c 'import torch; assert torch.__version__.startswith("2.13.0"); assert not torch.cuda.is_available()' 2>/dev/null; then
  pass "worker image: /opt/venv's python imports torch 2.13.0 (CUDA build; no GPU here)"
else fail "worker image: /opt/venv/bin/python cannot import torch 2.13.0"; fi

lc="$("${RUN[@]}" "$cctr" -- /lib64/ld-linux-x86-64.so.2 --list /usr/local/bin/otter-coord 2>&1 || true)"
if [ -z "$(missing <<< "$lc")" ] && grep -q 'libc.so.6 =>' <<< "$lc"; then
  pass "coordinator image: its loader resolves every library of otter-coord ($(grep -c '=>' <<< "$lc")): $(grep -o '^\s*lib[^ ]*' <<< "$lc" | tr -d '\t ' | tr '\n' ' ')"
else fail "coordinator image: otter-coord's libraries: $lc"; fi
cmnt="$(buildah mount "$cctr")"
torch_files="$(find "$cmnt" -xdev \( -name 'libtorch*' -o -name 'libc10*' \) -print | head -n 5)"
if [ -z "$torch_files" ]; then pass "coordinator image: no libtorch/libc10 file"; else fail "coordinator image holds $torch_files"; fi
shells="$(cd "$cmnt" && { ls -d bin/sh bin/bash bin/dash usr/bin/sh usr/bin/bash usr/bin/apt* usr/bin/dpkg* usr/bin/perl* usr/bin/python* 2>/dev/null || true; } | tr '\n' ' ')"
if [ -z "$shells" ]; then pass "coordinator image: no shell, package manager or interpreter"; else fail "coordinator image has $shells"; fi
buildah umount "$cctr" >/dev/null
for img in "$COORD_IMAGE" "$WORKER_IMAGE"; do
  cfg="$(buildah inspect --type image --format '{{.OCIv1.Config.User}} {{.OCIv1.Config.Entrypoint}}' "$img")"
  bin="otter-coord"; [ "$img" = "$WORKER_IMAGE" ] && bin="otter-worker"
  if [ "$cfg" = "10001:10001 [/usr/local/bin/$bin]" ]; then pass "$img: USER 10001:10001, ENTRYPOINT /usr/local/bin/$bin"
  else fail "$img: user/entrypoint $cfg"; fi
done

# --- sizes, times -----------------------------------------------------------------------------
echo
echo "== images"
buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' | grep -E 'otter-(coord|worker)|rust|debian|distroless' || true
echo "== times"
((${#build_s[@]})) && echo "build: ${build_s[*]}"
echo "job (coordinator start to its exit): ${job_s:-?} s; whole script: $(($(date +%s) - t_start)) s"
echo "== disk"
du -sh /var/lib/containers/storage /var/tmp/buildah-cache* 2>/dev/null || true
df -h / | tail -n 1
if [ -n "${OTTER_IMAGES_PRUNE:-}" ]; then
  buildah rmi --prune >/dev/null 2>&1 || true
  log "removed the intermediate images (OTTER_IMAGES_PRUNE)"
fi

echo
if ((${#failures[@]})); then
  echo "test-images: ${#failures[@]} FAILED:"
  printf '  %s\n' "${failures[@]}"
  exit 1
fi
echo "test-images: OK"
