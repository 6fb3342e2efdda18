#!/usr/bin/env bash
# Docker for the test suite on a fresh Debian machine: the engine, Compose v1 and debootstrap
# installed, the engine running, the project's images built. Idempotent: a machine that has all
# of it only pays for `docker info` and a cached `make build`.
set -euo pipefail
cd "$(dirname "$0")/.."

DOCKERD_LOG=${DOCKERD_LOG:-/var/log/hashlb-dockerd.log}
READY_SECONDS=${DOCKERD_READY_SECONDS:-60}

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }

missing=()
have dockerd || missing+=(docker.io)
if ! have docker-compose && ! docker compose version >/dev/null 2>&1; then
    missing+=(docker-compose)
fi
have debootstrap || missing+=(debootstrap)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "docker-setup: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
    # A machine handed on as it was may keep the pid file of an engine that no longer runs.
    if [ -f /var/run/docker.pid ] && ! kill -0 "$(cat /var/run/docker.pid)" 2>/dev/null; then
        rm -f /var/run/docker.pid
    fi
    echo "docker-setup: starting dockerd (log: $DOCKERD_LOG)"
    PATH="$PATH:/usr/sbin:/sbin" setsid nohup dockerd >"$DOCKERD_LOG" 2>&1 </dev/null &
    for _ in $(seq "$READY_SECONDS"); do
        docker info >/dev/null 2>&1 && break
        sleep 1
    done
    if ! docker info >/dev/null 2>&1; then
        echo "docker-setup: dockerd did not answer within ${READY_SECONDS}s" >&2
        tail -n 40 "$DOCKERD_LOG" >&2 || true
        exit 1
    fi
fi
echo "docker-setup: engine $(docker version --format '{{.Server.Version}}'), $(docker-compose version --short 2>/dev/null || docker compose version --short)"

make build
