#!/usr/bin/env bash
# Debian packages for images built with no container registry and for the real node of the local
# cluster (hack/images.py, hack/realnode.py): containerd + runc + CNI plugins + the netfilter tools
# kube-proxy and the kubelet call, buildah and mmdebstrap for images, gcc to compile the pause binary.
# Installs only what is missing; no package's service is started (policy-rc.d), the node starts its own.
set -euo pipefail

# command (or file) that proves the package is there -> package
declare -A probe=(
  [containerd]=containerd [runc]=runc [/usr/lib/cni/bridge]=containernetworking-plugins
  [iptables]=iptables [nft]=nftables [conntrack]=conntrack [buildah]=buildah
  [mmdebstrap]=mmdebstrap [socat]=socat [gcc]=gcc [/usr/include/stdio.h]=libc6-dev
)
need=()
for p in "${!probe[@]}"; do
  if [[ $p == /* ]]; then [ -e "$p" ] || need+=("${probe[$p]}"); else
    command -v "$p" >/dev/null 2>&1 || need+=("${probe[$p]}"); fi
done
[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" != 0 ]; then
  echo "install-node-deps: need root to apt-get install ${need[*]} (the real node runs as root)" >&2
  exit 1
fi
echo "install-node-deps: apt-get install ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
# policy-rc.d keeps the packages' postinst from starting system services (containerd above all).
tmp_policy=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
  tmp_policy=/usr/sbin/policy-rc.d
  printf '#!/bin/sh\nexit 101\n' > "$tmp_policy"
  chmod +x "$tmp_policy"
fi
trap '[ -n "$tmp_policy" ] && rm -f "$tmp_policy"' EXIT
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
