#!/usr/bin/env bash
# Install everything flanneld-py's demo, tests and bench need on a fresh Debian 12 machine:
# Debian packages (etcd, docker, iperf3, iproute2, iptables, ...) and a virtualenv in .venv with the
# package (C engine built) and its test extras. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

APT=1
[ "${1:-}" = "--no-apt" ] && APT=0
PY=${PY:-python3}
VENV=${VENV:-.venv}

need_pkgs=()
if [ "$APT" = 1 ]; then
    for pkg in etcd-server etcd-client iproute2 iptables iperf3 tcpdump busybox-static \
               docker.io ethtool conntrack gcc make openssl iputils-ping \
               mmdebstrap systemd-container; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need_pkgs+=("$pkg")
    done
    # the Python headers for the C engine
    "$PY" -c 'import sysconfig,os,sys; sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_paths()["include"],"Python.h")) else 1)' \
        || need_pkgs+=(python3-dev)
    "$PY" -c 'import ensurepip, venv' 2>/dev/null || need_pkgs+=(python3-venv)
    if [ ${#need_pkgs[@]} -gt 0 ]; then
        if [ "$(id -u)" != 0 ]; then
            echo "setup: need root to apt-get install: ${need_pkgs[*]}" >&2
            exit 1
        fi
        echo "setup: apt-get install ${need_pkgs[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating virtualenv $VENV"
    "$PY" -m venv "$VENV"
fi
echo "setup: pip install -e .[test,bench]"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[test,bench]'
"$VENV/bin/python" -c 'import flanneld_py._engine' 2>/dev/null \
    && echo "setup: C engine built" \
    || echo "setup: WARNING: C engine not built; the pure-Python engine will be used" >&2
