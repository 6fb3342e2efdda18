# The Docker Swarm deployment (included by the Makefile; docs/swarm.md explains it):
#   make swarm-images SWARM_NODES="ssh://root@node1 ssh://root@node2"
#                      put the images built here into every node (no image registry needed)
#   make swarm-up      deploy swarm-stack.yml on the manager DOCKER_HOST names (this engine if
#                      unset); returns once SWARM_URL serves
#   make swarm-down    remove the stack, every replica service, the network and the registry volume
#   make cluster-up    a local test cluster: a manager and CLUSTER_WORKERS workers as containers on
#                      this machine, images loaded, the stack deployed on http://127.0.0.1:5000
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
CLUSTER_DIR       ?= /tmp/$(CLUSTER)
CLUSTER_HEARTBEAT ?= 2s

SWARM_RUN = LB_DEPLOYMENT=$(LB_DEPLOYMENT) LB_NETWORK=$(LB_NETWORK) LB_PUBLISH_PORT=$(LB_PUBLISH_PORT) \
	LB_IMAGE=$(LB_IMAGE) LB_LB_IMAGE=$(LB_LB_IMAGE) DOCKER_SOCKET=$(DOCKER_SOCKET)
SERVICES_OF = $(DOCKER) service ls -q --filter label=hashlb.deployment=$(LB_DEPLOYMENT)

node-image: base-image  ## The test cluster's node image: the base plus Debian's Docker engine
	$(DOCKER) build --quiet --build-arg BASE_IMAGE=$(BASE_IMAGE) -t $(NODE_IMAGE) - <Dockerfile.node >/dev/null
	@echo "node image: $(NODE_IMAGE)"

swarm-images:  ## Load the replica and balancer images built here into every node of SWARM_NODES (docker hosts)
	@[ -n "$(SWARM_NODES)" ] || { echo "swarm-images: set SWARM_NODES to the nodes' docker hosts, e.g. ssh://root@node1" >&2; exit 1; }
	@for node in $(SWARM_NODES); do \
	    $(DOCKER) save $(LB_IMAGE) $(LB_LB_IMAGE) | DOCKER_HOST=$$node $(DOCKER) load --quiet >/dev/null || exit 1; \
	    echo "images loaded into $$node"; \
	done

swarm-up:  ## Deploy swarm-stack.yml on the swarm manager DOCKER_HOST names; returns once SWARM_URL serves
	@[ "$$($(DOCKER) info --format '{{.Swarm.ControlAvailable}}' 2>/dev/null)" = true ] || { \
	    echo "swarm-up: DOCKER_HOST=$${DOCKER_HOST:-(this engine)} is not a swarm manager" >&2; exit 1; }
	@labelled=$$($(DOCKER) node ls -q | xargs $(DOCKER) node inspect \
	        --format '{{.ID}} {{index .Spec.Labels "hashlb.balancer"}}' | awk '$$2 == "true" {print $$1}'); \
	if [ -z "$$labelled" ]; then \
	    self=$$($(DOCKER) info --format '{{.Swarm.NodeID}}'); \
	    $(DOCKER) node update --label-add hashlb.balancer=true $$self >/dev/null; \
	    echo "swarm-up: balancer, supervisor and registry go to this node ($$self)"; \
	fi
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
	        $(STACK)_lb $(STACK)_supervisor | grep -q '^updating$$' && \
	    python3 -c 'import json, urllib.request as u; o = u.build_opener(u.ProxyHandler({})); \
	        url = "$(SWARM_URL)"; \
	        n = json.load(o.open(url + "/rep", timeout=2))["message"]["N"]; \
	        n == 0 or o.open(url + "/home", timeout=2)' 2>/dev/null \
	        && { echo "serving on $(SWARM_URL)"; exit 0; }; \
	    sleep 0.5; \
	done; echo "not serving within $(SWARM_WAIT)s: see docker service ps $(STACK)_lb $(STACK)_supervisor" >&2; exit 1

swarm-down:  ## Remove the stack, then the replica services, the network and the registry volume
	@ids=$$($(DOCKER) service ls -q --filter label=com.docker.stack.namespace=$(STACK)); \
	[ -z "$$ids" ] || $(DOCKER) service rm $$ids >/dev/null  # the supervisor first: no new replicas
	@ids=$$($(SERVICES_OF) --filter label=hashlb.role=replica); \
	[ -z "$$ids" ] || { $(DOCKER) service rm $$ids >/dev/null; \
	    echo "removed $$(echo $$ids | wc -w) replica services of deployment $(LB_DEPLOYMENT)"; }
	@# The network and the volume go once the tasks' containers have stopped (a grace period
	@# each, longer on a loaded machine): up to SWARM_WAIT seconds.
	@end=$$(( $$(date +%s) + $(SWARM_WAIT) )); while [ $$(date +%s) -lt $$end ]; do \
	    $(DOCKER) stack rm $(STACK) >/dev/null 2>&1; \
	    [ -z "$$($(DOCKER) network ls -q --filter label=com.docker.stack.namespace=$(STACK))" ] && \
	    { ! $(DOCKER) volume inspect $(STACK)_registry >/dev/null 2>&1 || \
	      $(DOCKER) volume rm $(STACK)_registry >/dev/null 2>&1; } && \
	    { echo "stack $(STACK) removed"; exit 0; }; \
	    sleep 1; \
	done; echo "swarm-down: the network or the volume of $(STACK) is still in use" >&2; exit 1

CLUSTER_SOCKET = unix://$(CLUSTER_DIR)/$(1)/docker.sock
CLUSTER_NODES  = manager $(addprefix worker,$(shell seq $(CLUSTER_WORKERS)))

cluster-up: build node-image  ## A local test cluster: a manager and 2 workers as containers, images loaded, the stack deployed
	@CLUSTER=$(CLUSTER) CLUSTER_WORKERS=$(CLUSTER_WORKERS) CLUSTER_DIR=$(CLUSTER_DIR) \
	CLUSTER_HEARTBEAT=$(CLUSTER_HEARTBEAT) NODE_IMAGE=$(NODE_IMAGE) \
	LB_PUBLISH_PORT=$(LB_PUBLISH_PORT) bash ci/cluster.sh up
	@$(MAKE) --no-print-directory swarm-images \
	    SWARM_NODES="$(foreach node,$(CLUSTER_NODES),$(call CLUSTER_SOCKET,$(node)))"
	@DOCKER_HOST=$(call CLUSTER_SOCKET,manager) $(MAKE) --no-print-directory swarm-up
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
