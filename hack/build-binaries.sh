#!/usr/bin/env bash
# Builds the local control plane from Go modules (no prebuilt downloads are possible here):
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubectl  from k8s.io/kubernetes
#   etcd                                                            from go.etcd.io/etcd/server/v3
#   kwok                                                            with go install
# Results are cached outside the repo, one directory per version, and published by an atomic
# rename under an exclusive lock so concurrent runs never see a half-written cache.
# Prints the directory that holds all binaries (bin/) on stdout; progress goes to stderr.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.env
source "$here/versions.env"
# shellcheck source=k8s-wrapper.sh
source "$here/k8s-wrapper.sh"

cache_root="${KAITO_BIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kaito-py}"
bin_dir="$cache_root/bin/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION"
mkdir -p "$cache_root/bin"

log() { printf '[build-binaries] %s\n' "$*" >&2; }

want=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd kwok)
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

exec 9>"$cache_root/bin/.build.lock"
log "waiting for the build lock ($cache_root/bin/.build.lock)"
flock 9
if complete; then
  echo "$bin_dir"
  exit 0
fi

work="$(mktemp -d "$cache_root/bin/.build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
out="$work/out"
mkdir -p "$out"
start=$SECONDS

# --- Kubernetes: wrapper module that maps every staging module to its published v0.X.Y ----------
mkdir -p "$work/k8s"
k8s_wrapper_mod "$work/k8s" kaito.local/k8sbuild || exit 1
log "wrapper go.mod: $(grep -c '=>' "$work/k8s/go.mod") staging replaces"

commit="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"Hash": "\(.*\)".*/\1/p' | head -c 12 || true)"
major="${K8S_VERSION#v}"; major="${major%%.*}"
minor="${K8S_VERSION#v*.}"; minor="${minor%%.*}"
ldflags="$(k8s_ldflags "${commit:-unknown}")"
# client-go carries its own copy of the stamp used by kubectl's client version.
ldflags="$ldflags -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION \
 -X k8s.io/client-go/pkg/version.gitMajor=$major -X k8s.io/client-go/pkg/version.gitMinor=$minor"

cmds=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
(
  cd "$work/k8s"
  log "resolving k8s.io/kubernetes $K8S_VERSION dependencies"
  for c in "${cmds[@]}"; do go get "k8s.io/kubernetes/cmd/$c@$K8S_VERSION" >&2; done
  log "building ${cmds[*]}"
  go build -trimpath -ldflags "$ldflags" -o "$out/" $(printf 'k8s.io/kubernetes/cmd/%s ' "${cmds[@]}") >&2
)

# --- etcd: a one-file wrapper around etcdmain (the root module has local replaces) ----------------
mkdir -p "$work/etcd"
cat > "$work/etcd/main.go" <<'GO'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
(
  cd "$work/etcd"
  go mod init kaito.local/etcdbuild >/dev/null 2>&1
  go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >&2
  go mod tidy >&2
  log "building etcd $ETCD_VERSION"
  go build -trimpath -ldflags "-s -w" -o "$out/etcd" . >&2
)

# --- kwok ---------------------------------------------------------------------------------------
log "building kwok $KWOK_VERSION"
GOBIN="$out" go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" >&2

rm -rf "$bin_dir"
mv "$out" "$bin_dir"
log "built in $((SECONDS - start)) s into $bin_dir"
echo "$bin_dir"
