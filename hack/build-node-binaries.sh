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
# shellcheck source=k8s-wrapper.sh
source "$here/k8s-wrapper.sh"

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
k8s_wrapper_mod "$work/k8s" kaito.local/k8snodebuild || exit 1
ldflags="$(k8s_ldflags)"

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
