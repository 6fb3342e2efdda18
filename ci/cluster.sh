#!/usr/bin/env bash
# A Docker Swarm of containers on this machine, for trying and testing the multi-host setup:
#   ci/cluster.sh up     a node named manager and CLUSTER_WORKERS named worker1, worker2 ...,
#                        each a container running its own engine, joined into one swarm; the
#                        first CLUSTER_MANAGERS of them are swarm managers (3 by default: a swarm
#                        that keeps its quorum when any one node is lost, so the others still
#                        create services), the rest workers (`make cluster-up` also loads the
#                        images and deploys the stack)
#   ci/cluster.sh down   remove the node containers, their volumes, the network, the sockets' folder
# Everything it makes carries the label hashlb.cluster=$CLUSTER; `down` removes exactly that.
#
# Each node's engine answers on a socket in $CLUSTER_DIR/<node>/docker.sock on this machine
# (DOCKER_HOST=unix://...). Each node's port $LB_PUBLISH_PORT (where the stack publishes its
# balancer) is published on 127.0.0.1 only: on the ports CLUSTER_PORTS lists, one per node in
# the order above (default: LB_PUBLISH_PORT for the manager, the next ones for the workers).
#
# Why the node containers look as they do (checked on Debian's engine 20.10): --privileged
# fails in a sandbox without CAP_SYS_RESOURCE, so every other capability is given instead;
# /var/lib/docker is a Docker volume (overlay2 cannot sit on overlay2, vfs on tmpfs cannot run
# containers); /run is a tmpfs so no pid file of an earlier run survives a restart.
set -euo pipefail

CLUSTER=${CLUSTER:-hashlb-cluster}
CLUSTER_WORKERS=${CLUSTER_WORKERS:-2}
CLUSTER_MANAGERS=${CLUSTER_MANAGERS:-3}
CLUSTER_PORTS=${CLUSTER_PORTS:-}
CLUSTER_DIR=${CLUSTER_DIR:-/tmp/$CLUSTER}
CLUSTER_HEARTBEAT=${CLUSTER_HEARTBEAT:-2s}
NODE_IMAGE=${NODE_IMAGE:-hashlb-node:latest}
LB_PUBLISH_PORT=${LB_PUBLISH_PORT:-5000}
READY_SECONDS=${CLUSTER_READY_SECONDS:-60}
LABEL="hashlb.cluster=$CLUSTER"
# Who made it, e.g. a test run's "<pid>:<start time>", on its nodes, network and volumes: a
# later run removes a cluster whose owner is gone even if its nodes still run (a run killed
# before its teardown), or if it had made only the network.
CLUSTER_OWNER=${CLUSTER_OWNER:-}
OWNER="hashlb.cluster.owner=$CLUSTER_OWNER"
NETWORK="$CLUSTER-net"

say() { echo "cluster $CLUSTER: $*"; }
node_docker() { local node=$1; shift; DOCKER_HOST="unix://$CLUSTER_DIR/$node/docker.sock" docker "$@"; }
nodes() { echo manager; for i in $(seq "$CLUSTER_WORKERS"); do echo "worker$i"; done; }

wait_for() {  # wait_for WHAT COMMAND...: until COMMAND succeeds, READY_SECONDS at most
    local what=$1; shift
    for _ in $(seq $((READY_SECONDS * 4))); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.25
    done
    echo "cluster $CLUSTER: $what not ready within ${READY_SECONDS}s" >&2
    return 1
}

host_port() {  # host_port INDEX: where node number INDEX (0: the manager) is published
    local ports=($CLUSTER_PORTS)
    if [ -n "${ports[$1]:-}" ]; then echo "${ports[$1]}"; else echo $((LB_PUBLISH_PORT + $1)); fi
}

start_node() {
    local node=$1 index=$2 name="$CLUSTER-$1"
    local publish=(--publish "127.0.0.1:$(host_port "$index"):$LB_PUBLISH_PORT")
    mkdir -p "$CLUSTER_DIR/$node"
    docker volume create --label "$LABEL" --label "$OWNER" "$name" >/dev/null
    docker run --detach --name "$name" --hostname "$name" --label "$LABEL" \
        --label hashlb.role=node --label "$OWNER" \
        --network "$NETWORK" "${publish[@]}" \
        --cap-add=ALL --cap-drop=SYS_RESOURCE \
        --security-opt seccomp=unconfined --security-opt apparmor=unconfined \
        --volume /sys/fs/cgroup:/sys/fs/cgroup:rw --tmpfs /run \
        --volume "$name:/var/lib/docker" --volume "$CLUSTER_DIR/$node:/hashlb" \
        "$NODE_IMAGE" dockerd --host=unix:///var/run/docker.sock \
        --host=unix:///hashlb/docker.sock --storage-driver=overlay2 >/dev/null
}

up() {
    if [ -n "$(docker ps -aq --filter "label=$LABEL")" ]; then
        echo "cluster $CLUSTER exists already: make cluster-down CLUSTER=$CLUSTER first" >&2
        exit 1
    fi
    docker network create --label "$LABEL" --label "$OWNER" "$NETWORK" >/dev/null
    local index=0
    for node in $(nodes); do start_node "$node" "$index"; index=$((index + 1)); done
    for node in $(nodes); do wait_for "the engine of $node" node_docker "$node" info; done

    local manager_ip token manager_token
    manager_ip=$(docker inspect --format \
        "{{(index .NetworkSettings.Networks \"$NETWORK\").IPAddress}}" "$CLUSTER-manager")
    # A short dispatcher heartbeat: a stopped node is declared down in seconds, not 15 s.
    node_docker manager swarm init --advertise-addr "$manager_ip" \
        --dispatcher-heartbeat "$CLUSTER_HEARTBEAT" >/dev/null
    token=$(node_docker manager swarm join-token --quiet worker)
    manager_token=$(node_docker manager swarm join-token --quiet manager)
    local joined=1
    for node in $(nodes); do
        [ "$node" = manager ] && continue
        if [ "$joined" -lt "$CLUSTER_MANAGERS" ]; then
            node_docker "$node" swarm join --token "$manager_token" "$manager_ip:2377" >/dev/null
        else
            node_docker "$node" swarm join --token "$token" "$manager_ip:2377" >/dev/null
        fi
        joined=$((joined + 1))
    done
    local want=$((CLUSTER_WORKERS + 1))
    all_ready() { [ "$(node_docker manager node ls --format '{{.Status}}' | grep -c '^Ready$')" = "$want" ]; }
    wait_for "the swarm's $want nodes" all_ready
    local managers=$((CLUSTER_MANAGERS < want ? CLUSTER_MANAGERS : want))
    say "$want nodes ready, $managers of them managers (first manager at $manager_ip on $NETWORK;" \
        "DOCKER_HOST=unix://$CLUSTER_DIR/manager/docker.sock)"
}

down() {
    local containers volumes networks
    containers=$(docker ps -aq --filter "label=$LABEL")
    [ -z "$containers" ] || docker rm --force --volumes $containers >/dev/null
    volumes=$(docker volume ls -q --filter "label=$LABEL")
    [ -z "$volumes" ] || docker volume rm --force $volumes >/dev/null
    networks=$(docker network ls -q --filter "label=$LABEL")
    [ -z "$networks" ] || docker network rm $networks >/dev/null
    # The sockets' folder (only what `up` made: one folder per node, each with its socket).
    if [ -d "$CLUSTER_DIR" ]; then
        find "$CLUSTER_DIR" -mindepth 2 -maxdepth 2 -name docker.sock -delete
        find "$CLUSTER_DIR" -mindepth 1 -maxdepth 1 -type d -empty -delete
        rmdir "$CLUSTER_DIR" 2>/dev/null || true
    fi
    say "removed $(echo $containers | wc -w) node containers, $(echo $volumes | wc -w) volumes," \
        "$(echo $networks | wc -w) network"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
