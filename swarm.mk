# The Docker Swarm deployment (included by the Makefile; docs/swarm.md explains it):
#   make swarm-images SWARM_NODES="ssh://root@node1 ssh://root@node2"
#                      put the images built here into every node (no image registry needed)
#   make swarm-up      deploy swarm-stack.yml on the manager DOCKER_HOST names (this engine if
#                      unset), after labelling three nodes for the etcd members; returns once
#                      SWARM_URL serves
#   make swarm-down    remove the stack, every replica service, the network and the etcd volumes
#   make cluster-up    a local test cluster: CLUSTER_WORKERS + 1 nodes as containers on this
#                      machine (CLUSTER_MANAGERS of them managers), images loaded, the stack
#                      deployed, each node's balancer on a port of 127.0.0.1 (CLUSTER_PORTS)
#   make cluster-down  remove every container, volume and network of the test cluster
# e.g. make cluster-up LB_PUBLISH_PORT=8080 LB_N=6 ; make cluster-down

.PHONY: node-image swarm-images swarm-up swarm-down cluster-up cluster-down cluster-ps bench-swarm

STACK             ?= hashlb
SWARM_NODES       ?=
SWARM_URL         ?= http://127.0.0.1:$(LB_PUBLISH_PORT)
SWARM_WAIT        ?= 300
NODE_IMAGE        ?= hashlb-node:latest
CLUSTER           ?= hashlb-cluster
CLUSTER_WORKERS   ?= 2
CLUSTER_MANAGERS  ?= 3
CLUSTER_PORTS     ?=
CLUSTER_OWNER     ?=
CLUSTER_DIR       ?= /tmp/$(CLUSTER)
CLUSTER_HEARTBEAT ?= 2s

SWARM_RUN = LB_DEPLOYMENT=$(LB_DEPLOYMENT) LB_NETWORK=$(LB_NETWORK) LB_PUBLISH_PORT=$(LB_PUBLISH_PORT) \
	LB_IMAGE=$(LB_IMAGE) LB_LB_IMAGE=$(LB_LB_IMAGE) LB_ETCD_IMAGE=$(LB_ETCD_IMAGE) \
	DOCKER_SOCKET=$(DOCKER_SOCKET)
SERVICES_OF = $(DOCKER) service ls -q --filter label=hashlb.deployment=$(LB_DEPLOYMENT)

node-image: base-image  ## The test cluster's node image: the base plus Debian's Docker engine
	$(DOCKER) build --quiet --build-arg BASE_IMAGE=$(BASE_IMAGE) -t $(NODE_IMAGE) - <Dockerfile.node >/dev/null
	@echo "node image: $(NODE_IMAGE)"

swarm-images:  ## Load the replica, balancer and etcd images built here into every node of SWARM_NODES (docker hosts)
	@[ -n "$(SWARM_NODES)" ] || { echo "swarm-images: set SWARM_NODES to the nodes' docker hosts, e.g. ssh://root@node1" >&2; exit 1; }
	@for node in $(SWARM_NODES); do \
	    $(DOCKER) save $(LB_IMAGE) $(LB_LB_IMAGE) $(LB_ETCD_IMAGE) | DOCKER_HOST=$$node $(DOCKER) load --quiet >/dev/null || exit 1; \
	    echo "images loaded into $$node"; \
	done

swarm-up:  ## Deploy swarm-stack.yml on the swarm manager DOCKER_HOST names; returns once SWARM_URL serves
	@[ "$$($(DOCKER) info --format '{{.Swarm.ControlAvailable}}' 2>/dev/null)" = true ] || { \
	    echo "swarm-up: DOCKER_HOST=$${DOCKER_HOST:-(this engine)} is not a swarm manager" >&2; exit 1; }
	@# etcd member i runs on the node labelled hashlb.etcd=i: each member missing one gets a
	@# ready node without such a label, managers first.
	@nodes=$$($(DOCKER) node ls -q | xargs $(DOCKER) node inspect --format \
	        '{{.Spec.Role}} {{.Status.State}} {{.ID}} {{.Description.Hostname}} {{index .Spec.Labels "hashlb.etcd"}}'); \
	for member in 1 2 3; do \
	    echo "$$nodes" | awk -v m=$$member '$$5 == m {found = 1} END {exit !found}' && continue; \
	    pick=$$(echo "$$nodes" | awk '$$2 == "ready" && $$5 == ""' | sort -k1,1 -k4,4 | head -n1); \
	    [ -n "$$pick" ] || { echo "swarm-up: no node left for etcd member $$member: the stack needs" \
	        "three nodes, labelled hashlb.etcd=1, 2 and 3" >&2; exit 1; }; \
	    set -- $$pick; $(DOCKER) node update --label-add hashlb.etcd=$$member $$3 >/dev/null || exit 1; \
	    nodes=$$(echo "$$nodes" | awk -v id=$$3 -v m=$$member '$$3 == id {$$5 = m} {print}'); \
	    echo "swarm-up: etcd member $$member goes to node $$4"; \
	done; \
	managers=$$(echo "$$nodes" | awk '$$1 == "manager"' | wc -l); \
	[ "$$managers" -ge 2 ] || echo "swarm-up: one manager: the second supervisor has nowhere to" \
	    "run, and the swarm has no quorum to lose a node (three managers do)" >&2
	@# A CLI that has --detach (26 and newer) waits for the services to converge with it.
	@gid=$${DOCKER_GID:-$$($(DOCKER) run --rm --network none --label hashlb.role=build \
	        --volume $(DOCKER_SOCKET):/var/run/docker.sock --entrypoint stat $(LB_LB_IMAGE) \
	        -c %g /var/run/docker.sock)} && \
	detach=$$($(DOCKER) stack deploy --help | grep -q -- '--detach' && echo --detach=false --quiet); \
	$(SWARM_RUN) DOCKER_GID=$$gid $(DOCKER) stack deploy --resolve-image never $$detach \
	    --compose-file swarm-stack.yml $(STACK)
	@# Serving, and not by the task a re-deploy is replacing.
	@end=$$(( $$(date +%s) + $(SWARM_WAIT) )); while [ $$(date +%s) -lt $$end ]; do \
	    ! $(DOCKER) service inspect --format '{{if .UpdateStatus}}{{.UpdateStatus.State}}{{end}}' \
	        $(STACK)_lb $(STACK)_supervisor $(STACK)_etcd1 $(STACK)_etcd2 $(STACK)_etcd3 \
	        | grep -q '^updating$$' && \
	    python3 -c 'import json, urllib.request as u; o = u.build_opener(u.ProxyHandler({})); \
	        url = "$(SWARM_URL)"; \
	        n = json.load(o.open(url + "/rep", timeout=2))["message"]["N"]; \
	        n == 0 or o.open(url + "/home", timeout=2)' 2>/dev/null \
	        && { echo "serving on $(SWARM_URL)"; exit 0; }; \
	    sleep 0.5; \
	done; echo "not serving within $(SWARM_WAIT)s: see docker service ps $(STACK)_lb $(STACK)_supervisor" >&2; exit 1

# The job swarm-down runs on every node: remove this stack's volumes there (the etcd members'
# data) once no container uses them.
define VOLUMES_CLEANUP
import sys, time
import docker
client = docker.from_env()
labels = {"label": "com.docker.stack.namespace=$(STACK)"}
for _ in range(120):
    for volume in client.volumes.list(filters=labels):
        try:
            volume.remove()
        except docker.errors.APIError:
            pass
    if not client.volumes.list(filters=labels):
        sys.exit(0)
    time.sleep(1)
sys.exit("volumes still in use")
endef
export VOLUMES_CLEANUP

swarm-down:  ## Remove the stack, then the replica services, the network and the etcd volumes
	@ids=$$($(DOCKER) service ls -q --filter label=com.docker.stack.namespace=$(STACK)); \
	[ -z "$$ids" ] || $(DOCKER) service rm $$ids >/dev/null  # the supervisors first: no new replicas
	@# The network goes once the tasks' containers have stopped (a grace period each, longer on
	@# a loaded machine): up to SWARM_WAIT seconds. Replica services are removed on every round:
	@# a supervisor's last round, before its task has stopped, may have replaced some.
	@end=$$(( $$(date +%s) + $(SWARM_WAIT) )); removed=0; while [ $$(date +%s) -lt $$end ]; do \
	    ids=$$($(SERVICES_OF) --filter label=hashlb.role=replica); \
	    [ -z "$$ids" ] || { $(DOCKER) service rm $$ids >/dev/null 2>&1; \
	        removed=$$((removed + $$(echo $$ids | wc -w))); }; \
	    $(DOCKER) stack rm $(STACK) >/dev/null 2>&1; \
	    [ -z "$$ids" ] && [ -z "$$($(DOCKER) network ls -q --filter label=com.docker.stack.namespace=$(STACK))" ] && \
	    { echo "removed $$removed replica services of deployment $(LB_DEPLOYMENT)"; \
	      echo "stack $(STACK) removed"; exit 0; }; \
	    sleep 1; \
	done; echo "swarm-down: the network of $(STACK) is still in use" >&2; exit 1
	@# The etcd volumes sit on the nodes their members ran on: a job on every node (global-job,
	@# engine 20.10 and newer) removes them there. A node that is down keeps its own.
	@$(DOCKER) service rm $(STACK)_cleanup >/dev/null 2>&1 || true
	@# (Its output is only the warning that the image has no registry digest, unless it fails.)
	@said=$$($(DOCKER) service create --quiet --detach --name $(STACK)_cleanup --mode global-job \
	    --restart-condition none --user 0:0 --label hashlb.deployment=$(LB_DEPLOYMENT) \
	    --mount type=bind,source=$(DOCKER_SOCKET),target=/var/run/docker.sock \
	    $(LB_LB_IMAGE) python -c "$$VOLUMES_CLEANUP" 2>&1) || { echo "$$said" >&2; exit 1; }
	@end=$$(( $$(date +%s) + $(SWARM_WAIT) )); while [ $$(date +%s) -lt $$end ]; do \
	    states=$$($(DOCKER) service ps --format '{{.CurrentState}}' $(STACK)_cleanup 2>/dev/null); \
	    [ -n "$$states" ] && ! echo "$$states" | grep -qvE '^(Complete|Failed|Rejected|Shutdown)' && break; \
	    sleep 1; \
	done; \
	left=$$($(DOCKER) service ps --format '{{.Node}}: {{.CurrentState}} {{.Error}}' $(STACK)_cleanup \
	    | grep -v ': Complete'); \
	$(DOCKER) service rm $(STACK)_cleanup >/dev/null; \
	[ -z "$$left" ] && echo "etcd volumes of $(STACK) removed" || \
	    { echo "swarm-down: volumes of $(STACK) left on some nodes:"; echo "$$left"; } >&2

CLUSTER_SOCKET = unix://$(CLUSTER_DIR)/$(1)/docker.sock
CLUSTER_NODES  = manager $(addprefix worker,$(shell seq $(CLUSTER_WORKERS)))

cluster-up: build node-image  ## A local test cluster: 3 managers as containers, images loaded, the stack deployed
	@CLUSTER=$(CLUSTER) CLUSTER_WORKERS=$(CLUSTER_WORKERS) CLUSTER_MANAGERS=$(CLUSTER_MANAGERS) \
	CLUSTER_DIR=$(CLUSTER_DIR) CLUSTER_HEARTBEAT=$(CLUSTER_HEARTBEAT) NODE_IMAGE=$(NODE_IMAGE) \
	CLUSTER_PORTS="$(CLUSTER_PORTS)" CLUSTER_OWNER="$(CLUSTER_OWNER)" \
	LB_PUBLISH_PORT=$(LB_PUBLISH_PORT) bash ci/cluster.sh up
	@$(MAKE) --no-print-directory swarm-images \
	    SWARM_NODES="$(foreach node,$(CLUSTER_NODES),$(call CLUSTER_SOCKET,$(node)))"
	@DOCKER_HOST=$(call CLUSTER_SOCKET,manager) $(MAKE) --no-print-directory swarm-up \
	    SWARM_URL=http://127.0.0.1:$(firstword $(CLUSTER_PORTS) $(LB_PUBLISH_PORT))
	@echo "the cluster's manager: export DOCKER_HOST=$(call CLUSTER_SOCKET,manager)"

cluster-down:  ## Remove the test cluster: its node containers, their volumes, its network
	@CLUSTER=$(CLUSTER) CLUSTER_DIR=$(CLUSTER_DIR) bash ci/cluster.sh down

cluster-ps:  ## The test cluster's nodes, and where each replica runs
	@export DOCKER_HOST=$(call CLUSTER_SOCKET,manager); $(DOCKER) node ls; \
	ids=$$($(SERVICES_OF) --filter label=hashlb.role=replica); [ -z "$$ids" ] || \
	    $(DOCKER) service ps --filter desired-state=running \
	        --format 'table {{.Name}}\t{{.Node}}\t{{.CurrentState}}' $$ids

bench-swarm: $(STAMP)  ## Figures on a local 3-node cluster it builds and removes (about 5 min): bench/swarm-results.md
	@command -v wrk >/dev/null || { apt-get update -q && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk >/dev/null; }
	$(BIN)/python bench/swarm.py $(BENCH_ARGS)
