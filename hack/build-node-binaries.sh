#!/usr/bin/env bash
# Builds the real node's binaries from Go modules (hack/realnode.py uses them):
#   kubelet, kube-proxy   from k8s.io/kubernetes (the same wrapper module as hack/build-binaries.sh)
#   crictl                from sigs.k8s.io/cri-tools (teardown removes pod sandboxes through CRI)
# A cache directory and a lock of their own, so the control-plane cache of hack/build-binaries.sh
# keeps its key and neither build waits for the other. Published by an atomic rename.
# Prints the directory that holds the binaries on stdout; progress goes to stderr.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"

cache_root="${KAITO_BIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kaito-py}"
bin_dir="$cache_root/bin/node-k8s-$K8S_VERSION-critools-$CRI_TOOLS_VERSION"
mkdir -p "$cache_root/bin"

log() { printf '[build-node-binaries] %s\n' "$*" >&2; }

want=(kubelet kube-proxy crictl)
complete() {
  local b
  for b in "${want[@]}"; do [ -x "$bin_dir/$b" ] || return 1; done
}

if complete; then
  echo "$bin_dir"
  exit 0
fi

export GOFLAGS="${GOFLAGS:-} -mod=mod"
export GOTOOLCHAIN="${GOTOOLCHAIN:-auto}"
export CGO_ENABLED=0

exec 9>"$cache_root/bin/.node-build.lock"
log "waiting for the node build lock ($cache_root/bin/.node-build.lock)"
flock 9
if complete; then
  echo "$bin_dir"
  exit 0
fi

work="$(mktemp -d "$cache_root/bin/.node-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
out="$work/out"
mkdir -p "$out" "$work/k8s"
start=$SECONDS

# Wrapper module: k8s.io/kubernetes with every staging module mapped to its published v0.X.Y.
k8s_minor_tag="v0.${K8S_VERSION#v1.}"
mod_file="$(cd "$work" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
[ -f "$mod_file" ] || { log "could not download k8s.io/kubernetes@$K8S_VERSION go.mod"; exit 1; }
{
  echo "module kaito.local/k8snodebuild"
  echo
  grep -m1 '^go ' "$mod_file"
  echo
  echo "require k8s.io/kubernetes $K8S_VERSION"
  echo
  echo "replace ("
  sed -n 's#^\s*\(k8s\.io/[a-z0-9-]*\) => \./staging/src/.*#\1#p' "$mod_file" | while read -r m; do
    printf '\t%s => %s %s\n' "$m" "$m" "$k8s_minor_tag"
  done
  echo ")"
} > "$work/k8s/go.mod"

major="${K8S_VERSION#v}"; major="${major%%.*}"
minor="${K8S_VERSION#v*.}"; minor="${minor%%.*}"
pkg="k8s.io/component-base/version"
ldflags="-s -w -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor \
 -X $pkg.gitTreeState=clean -X $pkg.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"

cmds=(kubelet kube-proxy)
(
  cd "$work/k8s"
  for c in "${cmds[@]}"; do go get "k8s.io/kubernetes/cmd/$c@$K8S_VERSION" >&2; done
  log "building ${cmds[*]}"
  go build -trimpath -ldflags "$ldflags" -o "$out/" $(printf 'k8s.io/kubernetes/cmd/%s ' "${cmds[@]}") >&2
)

log "building crictl $CRI_TOOLS_VERSION"
GOBIN="$out" go install -trimpath -ldflags "-s -w" "sigs.k8s.io/cri-tools/cmd/crictl@$CRI_TOOLS_VERSION" >&2

rm -rf "$bin_dir"
mv "$out" "$bin_dir"
log "built in $((SECONDS - start)) s into $bin_dir"
echo "$bin_dir"
