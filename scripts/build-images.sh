#!/usr/bin/env bash
# Builds the container images of cluster/docker/ from this checkout:
#
#   scripts/build-images.sh [coordinator|worker|all]      (default: all)
#
#   otter-coord:dev   cluster/docker/coordinator.Dockerfile (rust:1-bookworm -> distroless cc)
#   otter-worker:dev  cluster/docker/worker.Dockerfile      (rust:1-bookworm -> debian:bookworm-slim)
#
# Builder: docker when a Docker daemon answers (`docker info`), otherwise buildah
# (`buildah bud --isolation chroot --layers`, installed from Debian's archive when
# missing). OTTER_BUILDER=buildah|docker forces one. OTTER_COORD_IMAGE / OTTER_WORKER_IMAGE
# rename the images; OTTER_BUILD_FLAGS adds flags to every build.
#
# Base images: each FROM of the Dockerfiles is used as it is when present locally or
# pullable. Where the registry cannot be reached (docker.io and gcr.io are not, from our
# development machines), a local STAND-IN with the same name is built from Debian's archive
# (mmdebstrap, same release: bookworm) and labelled org.otter.stand-in:
#
#   debian:bookworm-slim               mmdebstrap --variant=minbase bookworm, docs and man
#                                      pages left out as in the official slim image
#   rust:1-bookworm                    bookworm + build-essential, ca-certificates, curl, git,
#                                      pkg-config, and THIS HOST's Rust toolchain (rustc,
#                                      cargo, std; no docs) at /usr/local/rustup, with
#                                      /usr/local/cargo/bin on PATH, CARGO_HOME and RUSTUP_HOME
#                                      as the official image sets them (no rustup binary).
#                                      Its rustc must be >= Cargo.toml's rust-version
#                                      (Debian's rustc 1.63 is too old).
#   gcr.io/distroless/cc-debian12:nonroot
#                                      libc6, libgcc-s1, libstdc++6, libgomp1, libssl3,
#                                      ca-certificates (the bundle generated), tzdata, netbase,
#                                      base-files, /etc/passwd with root, nobody and nonroot
#                                      (65532), USER 65532: no shell, no package manager, no
#                                      other executables (everything in */bin and */sbin removed)
#
# The Dockerfiles are not changed for the stand-ins: a user with registry access builds
# the same files against the real bases. `scripts/build-images.sh --remove-stand-ins`
# deletes the stand-ins (and only them). Idempotent; a second build reuses the layer
# cache and the cargo cache mounts (see scripts/test-images.sh for times and sizes).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COORD_IMAGE="${OTTER_COORD_IMAGE:-otter-coord:dev}"
WORKER_IMAGE="${OTTER_WORKER_IMAGE:-otter-worker:dev}"
SUITE=bookworm
STANDIN_LABEL=org.otter.stand-in
read -r -a EXTRA <<< "${OTTER_BUILD_FLAGS:-}"

log() { echo "[build-images] $*" >&2; }
die() { log "$*"; exit 1; }
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"

# --- tools -------------------------------------------------------------------------------
ensure_debs() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  log "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

BUILDER="${OTTER_BUILDER:-}"
if [ -z "$BUILDER" ]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then BUILDER=docker; else BUILDER=buildah; fi
fi
case "$BUILDER" in
  buildah) ensure_debs buildah uidmap fuse-overlayfs ;;
  docker) ;;
  *) die "OTTER_BUILDER must be buildah or docker, not $BUILDER" ;;
esac

image_exists() {
  if [ "$BUILDER" = docker ]; then docker image inspect "$1" >/dev/null 2>&1
  else buildah inspect --type image "$1" >/dev/null 2>&1; fi
}
try_pull() {
  if [ "$BUILDER" = docker ]; then timeout 120 docker pull -q "$1" >/dev/null 2>&1
  else timeout 120 buildah pull --retry 0 -q "$1" >/dev/null 2>&1; fi
}
# The fully qualified names a Dockerfile's short name resolves to (docker's rules).
qualified() {
  local n="$1"
  case "${n%%/*}" in
    *.*|*:*|localhost) [[ "$n" == */* ]] && { echo "$n"; return; } ;;
  esac
  [[ "$n" == */* ]] && echo "docker.io/$n" || echo "docker.io/library/$n"
}

if [ "${1:-}" = "--remove-stand-ins" ]; then
  [ "$BUILDER" = buildah ] || die "--remove-stand-ins: buildah only"
  buildah images --filter "label=$STANDIN_LABEL" --format '{{.ID}}' | sort -u | xargs -r buildah rmi -f
  exit 0
fi

# --- stand-ins for base images that cannot be pulled ----------------------------------------
# mmdebstrap writes the root filesystem as a tar (no device nodes: the runtime provides
# /dev); the builder imports it with the image config the real image has.
DPKG_SLIM=(--dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*'
           --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*'
           --dpkgopt='path-exclude=/usr/share/info/*')
MMDEBSTRAP=(nice -n 19 mmdebstrap --quiet --mode=root --skip=output/dev --skip=output/mknod)

import_rootfs() {  # NAME TAR DESCRIPTION CONFIG-ARGS...  (buildah config flags)
  local name="$1" tar="$2" what="$3"; shift 3
  local q; q="$(qualified "$name")"
  if [ "$BUILDER" = docker ]; then
    local changes=() a
    # Only the flags used below: --env K=V, --cmd X, --user U, --workingdir D.
    while (($#)); do
      case "$1" in
        --env) changes+=(--change "ENV ${2%%=*}=${2#*=}") ;;
        --cmd) changes+=(--change "CMD [\"$2\"]") ;;
        --user) changes+=(--change "USER $2") ;;
        --workingdir) changes+=(--change "WORKDIR $2") ;;
        --label) changes+=(--change "LABEL $2") ;;
      esac
      shift 2
    done
    docker import "${changes[@]}" --change "LABEL $STANDIN_LABEL=\"$what\"" "$tar" "$q" >/dev/null
  else
    local ctr
    ctr="$(buildah from --quiet scratch)"
    buildah add --quiet "$ctr" "$tar" / >/dev/null
    buildah config --os linux --arch amd64 --label "$STANDIN_LABEL=$what" "$@" "$ctr"
    buildah commit --quiet --rm "$ctr" "$q" >/dev/null
  fi
  log "stand-in $q: $what"
}

standin_debian_slim() {  # NAME TMP
  "${MMDEBSTRAP[@]}" --variant=minbase "${DPKG_SLIM[@]}" \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/log/*.log' \
    "$SUITE" "$2/rootfs.tar"
  import_rootfs "$1" "$2/rootfs.tar" "mmdebstrap --variant=minbase $SUITE (Debian archive)" \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd bash
}

rust_min_version() {  # the highest rust-version of the workspace's packages
  grep -h '^rust-version' "$ROOT/Cargo.toml" "$ROOT"/crates/*/Cargo.toml 2>/dev/null \
    | sed -E 's/.*"([0-9.]+)".*/\1/' | sort -V | tail -n 1
}

standin_rust() {  # NAME TMP
  command -v rustc >/dev/null && command -v cargo >/dev/null \
    || die "rust:1-bookworm stand-in: no Rust toolchain on this host (install rustup), and Debian's rustc is too old"
  local sysroot version need triple toolchain
  sysroot="$(rustc --print sysroot)"
  version="$(rustc --version | awk '{print $2}')"
  triple="$(rustc -vV | sed -n 's/^host: //p')"
  need="$(rust_min_version)"
  [ "$(printf '%s\n%s\n' "$need" "$version" | sort -V | head -n 1)" = "$need" ] \
    || die "rust:1-bookworm stand-in: the host's rustc $version is older than rust-version $need"
  [ -x "$sysroot/bin/cargo" ] || die "rust:1-bookworm stand-in: no cargo in $sysroot/bin"
  toolchain="$version-$triple"
  # A build stage fetches crates and wheels over HTTPS: it trusts what this host trusts
  # beyond Debian's bundle (/usr/local/share/ca-certificates: a proxy's CA, say). Only
  # the build stage is affected; the runtime images never see these certificates.
  local cas=""
  compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null \
    && cas=" + this host's local CA certificates ($(cd /usr/local/share/ca-certificates && ls -- *.crt | tr '\n' ' ' | sed 's/ $//'))"
  # The toolchain goes in by a customize hook: rustc, cargo, rustdoc and the standard
  # library (no docs: rust-docs is most of a rustup toolchain's size).
  "${MMDEBSTRAP[@]}" --variant=minbase "${DPKG_SLIM[@]}" \
    --include=build-essential,ca-certificates,curl,git,pkg-config \
    --customize-hook="mkdir -p \"\$1/usr/local/rustup/toolchains/$toolchain\" \"\$1/usr/local/cargo/bin\" && tar -C '$sysroot' --exclude=./share/doc -cf - . | tar -C \"\$1/usr/local/rustup/toolchains/$toolchain\" -xf - && for b in cargo rustc rustdoc; do ln -s ../../rustup/toolchains/$toolchain/bin/\$b \"\$1/usr/local/cargo/bin/\$b\"; done && chmod -R a+w \"\$1/usr/local/cargo\" \"\$1/usr/local/rustup\"" \
    --customize-hook='for c in /usr/local/share/ca-certificates/*.crt; do [ -f "$c" ] && cp "$c" "$1/usr/local/share/ca-certificates/"; done; chroot "$1" update-ca-certificates >/dev/null' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/log/*.log' \
    "$SUITE" "$2/rootfs.tar"
  import_rootfs "$1" "$2/rootfs.tar" "mmdebstrap --variant=minbase $SUITE + build-essential,ca-certificates,curl,git,pkg-config + the host's rustc $version$cas" \
    --env RUSTUP_HOME=/usr/local/rustup --env CARGO_HOME=/usr/local/cargo \
    --env PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env RUST_VERSION="$version" --cmd bash
}

standin_distroless_cc() {  # NAME TMP
  # --variant=extract: the packages' files only (no maintainer scripts, no dpkg database,
  # no customize hooks), into a directory finished here. Their dependencies come along
  # (openssl, debconf, perl-base, mawk): every executable under */bin and */sbin is
  # removed, the interpreters' libraries with them.
  local r="$2/rootfs"
  "${MMDEBSTRAP[@]}" --variant=extract "${DPKG_SLIM[@]}" \
    --include=base-files,netbase,tzdata,ca-certificates,libc6,libssl3,libgcc-s1,libgomp1,libstdc++6 \
    "$SUITE" "$r"
  (
    set -e
    cd "$r"
    awk 1 usr/share/ca-certificates/mozilla/*.crt > etc/ssl/certs/ca-certificates.crt
    rm -rf dev/* bin/* sbin/* usr/bin/* usr/sbin/* usr/share/perl* usr/lib/x86_64-linux-gnu/perl* usr/share/debconf \
      etc/apt var/lib/apt var/cache/apt var/lib/dpkg var/cache/debconf var/lib/debconf var/log/* etc/dpkg \
      etc/debconf.conf usr/share/doc usr/share/man usr/share/lintian etc/update-motd.d usr/lib/ssl/misc
    printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > etc/passwd
    printf 'root:x:0:\nnobody:x:65534:\ntty:x:5:\nstaff:x:50:\nnonroot:x:65532:\n' > etc/group
    install -d -m 0700 -o 65532 -g 65532 home/nonroot
    install -d -m 1777 tmp
    ln -sf /usr/share/zoneinfo/Etc/UTC etc/localtime
    tar --numeric-owner -cf "$2/rootfs.tar" .
  )
  rm -rf "$r"
  import_rootfs "$1" "$2/rootfs.tar" "mmdebstrap --variant=extract $SUITE: libc6 libgcc-s1 libstdc++6 libgomp1 libssl3 ca-certificates tzdata netbase, no executables" \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    --user 65532 --workingdir /home/nonroot
}

ensure_base() {
  local name="$1" q fn tmp
  q="$(qualified "$name")"
  image_exists "$q" && return 0
  if try_pull "$q"; then log "pulled $q"; return 0; fi
  case "$name" in
    debian:bookworm-slim) fn=standin_debian_slim ;;
    rust:1-bookworm) fn=standin_rust ;;
    gcr.io/distroless/cc-debian12:nonroot) fn=standin_distroless_cc ;;
    *) die "$name cannot be pulled and has no stand-in recipe here" ;;
  esac
  log "$q cannot be pulled: building a stand-in from Debian's archive"
  ensure_debs mmdebstrap
  tmp="$(mktemp -d "${TMPDIR:-/var/tmp}/otter-standin.XXXXXX")"
  "$fn" "$name" "$tmp" || { rm -rf "$tmp"; die "stand-in $name failed"; }
  rm -rf "$tmp"
}

# The base images of a Dockerfile: FROM lines that are not earlier stages.
bases_of() {
  awk 'toupper($1)=="FROM" { for (i = 2; i <= NF; i++) if ($i !~ /^--/) { img = $i; break }
                             stage = (toupper($(i+1)) == "AS") ? $(i+2) : ""
                             if (!(img in stages)) print img
                             if (stage != "") stages[stage] = 1 }' "$1"
}

# --- build -------------------------------------------------------------------------------
# A build that would fill the disk is stopped first: the worker's first build briefly
# needs about four times its 4 GB venv layer (the copy, then the commit's diff and layer).
MIN_FREE_GB="${OTTER_IMAGES_MIN_FREE_GB:-2}"
guarded() {  # CMD...: runs CMD, stopped when the storage's filesystem falls below MIN_FREE_GB
  local dirs=(/var/tmp) pid avail d
  if [ "$BUILDER" = docker ]; then dirs+=("$(docker info --format '{{.DockerRootDir}}' 2>/dev/null || echo /)")
  else dirs+=("$(buildah info --format '{{.store.GraphRoot}}' 2>/dev/null || echo /var/lib/containers)"); fi
  setsid "$@" < /dev/null &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    for d in "${dirs[@]}"; do
      avail=$(df --output=avail -k "$d" 2>/dev/null | tail -n 1)
      if [ -n "$avail" ] && ((avail < MIN_FREE_GB * 1024 * 1024)); then
        kill -TERM -- "-$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        die "stopped the build: less than ${MIN_FREE_GB} GB free on $d (OTTER_IMAGES_MIN_FREE_GB); free some space, remove the build's leftover containers (buildah containers; buildah rm ID) and run again"
      fi
    done
    sleep 2
  done
  wait "$pid"
}

build() {  # DOCKERFILE IMAGE
  local df="$ROOT/cluster/docker/$1.Dockerfile" image="$2" b t0
  for b in $(bases_of "$df"); do ensure_base "$b"; done
  t0=$(date +%s)
  log "building $image from cluster/docker/$1.Dockerfile ($BUILDER)"
  if [ "$BUILDER" = docker ]; then
    DOCKER_BUILDKIT=1 guarded nice -n 19 docker build "${EXTRA[@]}" -f "$df" -t "$image" "$ROOT"
  else
    # --pull=false: a base image present locally (pulled or stand-in) is used as it is.
    guarded nice -n 19 buildah bud --isolation chroot --layers --force-rm --pull=false --network host \
      "${EXTRA[@]}" -f "$df" -t "$image" "$ROOT"
  fi
  log "built $image in $(($(date +%s) - t0)) s"
}

case "${1:-all}" in
  coordinator) build coordinator "$COORD_IMAGE" ;;
  worker) build worker "$WORKER_IMAGE" ;;
  all) build coordinator "$COORD_IMAGE"; build worker "$WORKER_IMAGE" ;;
  *) die "usage: $0 [coordinator|worker|all|--remove-stand-ins]" ;;
esac
if [ "$BUILDER" = buildah ]; then
  buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' | grep -E "(otter-coord|otter-worker)" >&2 || true
fi
