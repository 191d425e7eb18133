#!/usr/bin/env bash
# Builds the install-test tools from Go modules (no prebuilt downloads are possible here):
#   helm        helm.sh/helm/v3/cmd/helm            (renders config/helm/kaito)
#   kubeconform github.com/yannh/kubeconform/cmd/kubeconform  (offline schema validation)
#   prometheus  github.com/prometheus/prometheus/cmd/prometheus, with only its Kubernetes service
#               discovery compiled in (Debian's prometheus package leaves Kubernetes discovery out;
#               hack/prometheus.py needs it to scrape what the chart's ServiceMonitors select)
#   crds/monitoring.coreos.com_{servicemonitors,prometheusrules}.yaml from the prometheus-operator Go
#               module, so the install tests can register the real CRDs on the local apiserver
# Same scheme as hack/build-binaries.sh: one cache directory per version set, filled under an exclusive
# lock; each file is published by an atomic rename, and readers that find any file missing take the
# lock and build what is missing, so a concurrent run never uses a half-written tool.
# Prints the directory that holds the tools on stdout; progress goes to stderr.
set -euo pipefail

# Pinned; bump together with a test run (the chart uses only long-stable template functions).
HELM_VERSION="${HELM_VERSION:-v3.22.0}"
KUBECONFORM_VERSION="${KUBECONFORM_VERSION:-v0.8.0}"
PROMETHEUS_OPERATOR_VERSION="${PROMETHEUS_OPERATOR_VERSION:-v0.85.0}"
# The Go module version of a Prometheus 3 release (module v0.3XY.Z is Prometheus v3.XY.Z). Its version
# lives in a stamp file next to the binary, so a bump rebuilds only Prometheus.
PROMETHEUS_MODULE_VERSION="${PROMETHEUS_MODULE_VERSION:-v0.316.0}"

cache_root="${KAITO_BIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kaito-py}"
tools_dir="$cache_root/bin/tools-helm-$HELM_VERSION-kubeconform-$KUBECONFORM_VERSION-promop-$PROMETHEUS_OPERATOR_VERSION"
mkdir -p "$cache_root/bin"

log() { printf '[build-tools] %s\n' "$*" >&2; }

crds=(crds/monitoring.coreos.com_servicemonitors.yaml crds/monitoring.coreos.com_prometheusrules.yaml)
have_helm() { [ -x "$tools_dir/helm" ]; }
have_kubeconform() { [ -x "$tools_dir/kubeconform" ]; }
have_prometheus() {
  [ -x "$tools_dir/prometheus" ] && [ "$(cat "$tools_dir/prometheus.version" 2>/dev/null)" = "$PROMETHEUS_MODULE_VERSION" ]
}
have_crds() {
  local c
  for c in "${crds[@]}"; do [ -s "$tools_dir/$c" ] || return 1; done
}
complete() { have_helm && have_kubeconform && have_prometheus && have_crds; }

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
mkdir -p "$out" "$tools_dir/crds"
start=$SECONDS

# Moves $out/$1 into the tools directory in one rename (same file system).
publish() { mv -f "$out/$1" "$tools_dir/$1"; }

if ! have_helm; then
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
  publish helm
fi

if ! have_kubeconform; then
  log "building kubeconform $KUBECONFORM_VERSION"
  GOBIN="$out" go install -trimpath -ldflags "-s -w" \
    "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION" >&2
  publish kubeconform
fi

if ! have_prometheus; then
  log "building prometheus (module $PROMETHEUS_MODULE_VERSION, Kubernetes discovery only)"
  # remove_all_sd drops every service discovery plugin but the ones enabled by name.
  GOBIN="$out" go install -trimpath -ldflags "-s -w" -tags remove_all_sd,enable_kubernetes_sd \
    "github.com/prometheus/prometheus/cmd/prometheus@$PROMETHEUS_MODULE_VERSION" >&2
  echo "$PROMETHEUS_MODULE_VERSION" > "$out/prometheus.version"
  # The binary first, then the stamp that declares it complete.
  publish prometheus
  publish prometheus.version
fi

if ! have_crds; then
  log "fetching the prometheus-operator $PROMETHEUS_OPERATOR_VERSION CRDs"
  mod_dir="$(cd "$work" && go mod download -json \
    "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" \
    | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')"
  mkdir -p "$out/crds"
  for c in "${crds[@]}"; do
    src="$mod_dir/example/prometheus-operator-crd/${c#crds/}"
    [ -s "$src" ] || { log "no CRD at $src"; exit 1; }
    cp "$src" "$out/$c"
    publish "$c"
  done
fi

log "built in $((SECONDS - start)) s into $tools_dir"
echo "$tools_dir"
