#!/usr/bin/env bash
# Debian packages some test suites drive as real peers: docker-registry (an OCI registry for adapter
# push/pull) and prometheus (promtool checks our /metrics). Installs only what is missing.
set -euo pipefail

need=()
command -v docker-registry >/dev/null 2>&1 || [ -x /usr/bin/docker-registry ] || need+=(docker-registry)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
[ ${#need[@]} -eq 0 ] && exit 0

sudo=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
    echo "install-system-deps: need root (or sudo) to apt-get install ${need[*]}" >&2
    exit 1
  fi
fi
echo "install-system-deps: apt-get install ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq >/dev/null
# policy-rc.d keeps the packages' postinst from starting system services: tests start their own.
tmp_policy=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
  tmp_policy=/usr/sbin/policy-rc.d
  printf '#!/bin/sh\nexit 101\n' | $sudo tee "$tmp_policy" >/dev/null
  $sudo chmod +x "$tmp_policy"
fi
trap '[ -n "$tmp_policy" ] && $sudo rm -f "$tmp_policy"' EXIT
$sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
