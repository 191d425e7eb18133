#!/usr/bin/env bash
# Builds the install-test tools from Go modules (no prebuilt downloads are possible here):
#   helm        helm.sh/helm/v3/cmd/helm            (renders config/helm/kaito)
#   kubeconform github.com/yannh/kubeconform/cmd/kubeconform  (offline schema validation)
#   crds/monitoring.coreos.com_servicemonitors.yaml from the prometheus-operator Go module, so the
#               install tests can register the real ServiceMonitor CRD on the local apiserver
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
servicemonitor_crd=crds/monitoring.coreos.com_servicemonitors.yaml
complete() {
  local b
  for b in "${want[@]}"; do [ -x "$tools_dir/$b" ] || return 1; done
  [ -s "$tools_dir/$servicemonitor_crd" ]
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

log "fetching the ServiceMonitor CRD from prometheus-operator $PROMETHEUS_OPERATOR_VERSION"
mod_dir="$(cd "$work" && go mod download -json \
  "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" \
  | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')"
src="$mod_dir/example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml"
[ -s "$src" ] || { log "no ServiceMonitor CRD at $src"; exit 1; }
mkdir -p "$out/crds"
cp "$src" "$out/$servicemonitor_crd"

rm -rf "$tools_dir"
mv "$out" "$tools_dir"
log "built in $((SECONDS - start)) s into $tools_dir"
echo "$tools_dir"
