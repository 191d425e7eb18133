#!/usr/bin/env bash
# Builds the install-test tools from Go modules (no prebuilt downloads are possible here):
#   helm        helm.sh/helm/v3/cmd/helm            (renders config/helm/kaito)
#   kubeconform github.com/yannh/kubeconform/cmd/kubeconform  (offline schema validation)
#   crds/monitoring.coreos.com_{servicemonitors,prometheusrules}.yaml from the prometheus-operator Go
#               module, so the install tests can register the real CRDs on the local apiserver
# Same scheme as hack/build-binaries.sh: one cache directory per version set, built under an
# exclusive lock and published by an atomic rename, so concurrent runs never see a half-written dir.
# Prints the directory that holds the tools on stdout; progress goes to stderr.
set -euo pipefail

# Pinned; bump together with a test run (the chart uses only long-stable template functions).
HELM_VERSION="${HELM_VERSION:-v3.22.0}"
KUBECONFORM_VERSION="${KUBECONFORM_VERSION:-v0.8.0}"
PROMETHEUS_OPERATOR_VERSION="${PROMETHEUS_OPERATOR_VERSION:-v0.85.0}"

cache_root="${KAITO_BIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kaito-py}"
tools_dir="$cache_root/bin/tools-helm-$HELM_VERSION-kubeconform-$KUBECONFORM_VERSION-promop-$PROMETHEUS_OPERATOR_VERSION"
mkdir -p "$cache_root/bin"

log() { printf '[build-tools] %s\n' "$*" >&2; }

want=(helm kubeconform)
crds=(crds/monitoring.coreos.com_servicemonitors.yaml crds/monitoring.coreos.com_prometheusrules.yaml)
binaries_built() {
  local b
  for b in "${want[@]}"; do [ -x "$tools_dir/$b" ] || return 1; done
}
crds_fetched() {
  local c
  for c in "${crds[@]}"; do [ -s "$tools_dir/$c" ] || return 1; done
}
complete() { binaries_built && crds_fetched; }

# Copies the prometheus-operator CRDs into $1/crds (from the Go module cache).
fetch_crds() {
  local dest="$1" mod_dir c
  log "fetching the prometheus-operator $PROMETHEUS_OPERATOR_VERSION CRDs"
  mod_dir="$(cd "$work" && go mod download -json \
    "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" \
    | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')"
  mkdir -p "$dest/crds"
  for c in "${crds[@]}"; do
    src="$mod_dir/example/prometheus-operator-crd/${c#crds/}"
    [ -s "$src" ] || { log "no CRD at $src"; exit 1; }
    cp "$src" "$dest/$c.tmp"
    mv "$dest/$c.tmp" "$dest/$c"
  done
}

if complete; then
  echo "$tools_dir"
  exit 0
fi

export GOFLAGS="${GOFLAGS:-} -mod=mod"
export GOTOOLCHAIN="${GOTOOLCHAIN:-auto}"
export CGO_ENABLED=0

# A lock of its own: building tools must not wait behind (or block) the control-plane build.
exec 9>"$cache_root/bin/.tools.lock"
log "waiting for the tools lock ($cache_root/bin/.tools.lock)"
flock 9
if complete; then
  echo "$tools_dir"
  exit 0
fi

work="$(mktemp -d "$cache_root/bin/.tools.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# Binaries already built by an older version of this script: only the CRD list grew.
if binaries_built; then
  fetch_crds "$tools_dir"
  echo "$tools_dir"
  exit 0
fi
out="$work/out"
mkdir -p "$out"
start=$SECONDS

log "building helm $HELM_VERSION"
# Stamp what helm's Makefile stamps: its version, and the Kubernetes version of its client-go as the
# default for .Capabilities.KubeVersion (unstamped it says v1.20.0 and fails charts' kubeVersion).
helm_mod="$(cd "$work" && go mod download -json "helm.sh/helm/v3@$HELM_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
client_go="$(sed -n 's#^\s*k8s\.io/client-go v0\.\([0-9]*\)\..*#\1#p' "$helm_mod" | head -1)"
[ -n "$client_go" ] || { log "no k8s.io/client-go version in $helm_mod"; exit 1; }
helm_ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
  helm_ldflags="$helm_ldflags -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$client_go"
done
GOBIN="$out" go install -trimpath -ldflags "$helm_ldflags" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2

log "building kubeconform $KUBECONFORM_VERSION"
GOBIN="$out" go install -trimpath -ldflags "-s -w" \
  "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION" >&2

fetch_crds "$out"

rm -rf "$tools_dir"
mv "$out" "$tools_dir"
log "built in $((SECONDS - start)) s into $tools_dir"
echo "$tools_dir"
