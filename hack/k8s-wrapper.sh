# Sourced by hack/build-binaries.sh and hack/build-node-binaries.sh (after versions.env): the wrapper Go
# module both build k8s.io/kubernetes commands in, and the version stamp they link in.

# k8s_wrapper_mod DIR MODULE: writes DIR/go.mod requiring k8s.io/kubernetes@$K8S_VERSION with every
# staging module (k8s.io/api, k8s.io/client-go, ...) replaced by its published v0.X.Y; prints nothing.
k8s_wrapper_mod() {
  local dir="$1" module="$2" minor_tag="v0.${K8S_VERSION#v1.}" mod_file
  mod_file="$(cd "$dir" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
  [ -f "$mod_file" ] || { echo "could not download k8s.io/kubernetes@$K8S_VERSION go.mod" >&2; return 1; }
  {
    echo "module $module"
    echo
    grep -m1 '^go ' "$mod_file"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    echo "replace ("
    sed -n 's#^\s*\(k8s\.io/[a-z0-9-]*\) => \./staging/src/.*#\1#p' "$mod_file" | while read -r m; do
      printf '\t%s => %s %s\n' "$m" "$m" "$minor_tag"
    done
    echo ")"
  } > "$dir/go.mod"
}

# k8s_ldflags [COMMIT]: -ldflags for k8s.io/component-base's version stamp ($K8S_VERSION, now).
k8s_ldflags() {
  local major minor pkg="k8s.io/component-base/version"
  major="${K8S_VERSION#v}"; major="${major%%.*}"
  minor="${K8S_VERSION#v*.}"; minor="${minor%%.*}"
  echo "-s -w -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor" \
    "-X $pkg.gitTreeState=clean -X $pkg.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    "${1:+-X $pkg.gitCommit=$1}"
}
