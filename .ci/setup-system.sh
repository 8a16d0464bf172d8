#!/usr/bin/env bash
# Debian packages and settings the container, Kubernetes, multi-node and MLflow tests need (run as root; idempotent,
# quiet).
#   podman + runc: build and run images without a daemon; debootstrap: the local base image (no pulls offline);
#   iproute2: network namespaces for the two-host torchrun test; postgresql: initdb/pg_ctl for the throwaway cluster
#   that tests/test_mlflow_postgres.py runs the MLflow server on (as the package's `postgres` user: PostgreSQL
#   refuses to run as root). The cluster the package creates is not started here.
# Safe to run repeatedly: installs only what is missing and rewrites the containers.conf it owns.
set -euo pipefail
PACKAGES=(podman runc debootstrap iproute2 uidmap fuse-overlayfs ca-certificates postgresql)

if [ "$(id -u)" -ne 0 ]; then
    echo "setup-system: needs root (apt-get, network namespaces); skipping" >&2
    exit 0
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    # policy-rc.d 101: the package's own cluster is created but not started (no service manager here).
    policy=/usr/sbin/policy-rc.d
    [ -e "$policy" ] || { printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; trap 'rm -f "$policy"' EXIT; }
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# podman's defaults need a few adjustments in a container-less CI VM (see shared/reference/offline.md):
# runc instead of crun, and ulimits the VM allows.
mkdir -p /etc/containers
conf=/etc/containers/containers.conf
marker="# managed by crescent .ci/setup-system.sh"
if ! grep -qF "$marker" "$conf" 2>/dev/null; then
    cat >"$conf" <<CONF
$marker
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
runtime = "runc"
CONF
fi
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
echo "setup-system: podman $(podman --version | awk '{print $3}'), debootstrap, iproute2, PostgreSQL $("$pg_bin/initdb" --version | awk '{print $3}') ready"
