# The Docker deployment's life cycle (included by the Makefile):
#   make build   base image (if needed) + wheels + the replica, balancer and etcd images
#   make up      the compose stack: balancer on 127.0.0.1:$(LB_PUBLISH_PORT), supervisor, N replicas
#   make down    everything of the stack gone: replicas (also those /add started), network, volume
# The variables below can be set on the command line or in the environment, e.g.
#   make up LB_PUBLISH_PORT=8080 COMPOSE_PROJECT=demo LB_DEPLOYMENT=demo LB_NETWORK=demo-net

.PHONY: base-image wheels build up down logs ps docker-clean

DOCKER          ?= docker
COMPOSE         ?= $(shell $(DOCKER) compose version >/dev/null 2>&1 && echo "$(DOCKER) compose" || echo docker-compose)
COMPOSE_PROJECT ?= hashlb
LB_DEPLOYMENT   ?= hashlb
LB_NETWORK      ?= net1
LB_PUBLISH_PORT ?= 5000
LB_IMAGE        ?= hashlb-server:latest
LB_LB_IMAGE     ?= hashlb-lb:latest
LB_ETCD_IMAGE   ?= hashlb-etcd:latest
DOCKER_SOCKET   ?= /var/run/docker.sock

# The base image: the official slim image when it is here (PULL_BASE=yes tries to pull it first),
# else a Debian image built locally with debootstrap from the machine's own Debian mirror (no
# image registry needed). BASE_IMAGE=... picks any other Debian-like image with python3-venv.
DEFAULT_BASE    := python:3.12-slim
LOCAL_BASE      ?= hashlb-base:bookworm
BASE_SUITE      ?= bookworm
PULL_BASE       ?= no
BASE_IMAGE      ?= $(shell $(DOCKER) image inspect $(DEFAULT_BASE) >/dev/null 2>&1 && echo $(DEFAULT_BASE) || echo $(LOCAL_BASE))
WHEELS          ?= wheels

COMPOSE_RUN = LB_DEPLOYMENT=$(LB_DEPLOYMENT) LB_NETWORK=$(LB_NETWORK) \
	LB_PUBLISH_PORT=$(LB_PUBLISH_PORT) LB_IMAGE=$(LB_IMAGE) LB_LB_IMAGE=$(LB_LB_IMAGE) \
	BASE_IMAGE=$(BASE_IMAGE) DOCKER_SOCKET=$(DOCKER_SOCKET) \
	DOCKER_GID=$$(stat -c %g $(DOCKER_SOCKET)) \
	$(COMPOSE) -p $(COMPOSE_PROJECT) -f docker-compose.yml
REPLICAS_OF = $(DOCKER) ps -aq --filter label=hashlb.deployment=$(LB_DEPLOYMENT) --filter label=hashlb.role=replica

base-image:  ## The base image: python:3.12-slim if here (PULL_BASE=yes: pull it), else one built with debootstrap
	@base="$(BASE_IMAGE)"; \
	if [ "$(PULL_BASE)" = yes ] && [ "$$base" = "$(LOCAL_BASE)" ] && $(DOCKER) pull $(DEFAULT_BASE); then \
	    base=$(DEFAULT_BASE); fi; \
	if [ "$$base" != "$(LOCAL_BASE)" ]; then \
	    echo "base image: $$base"; \
	elif $(DOCKER) image inspect $(LOCAL_BASE) >/dev/null 2>&1; then \
	    echo "base image: $(LOCAL_BASE) (built earlier)"; \
	else \
	    echo "base image: building $(LOCAL_BASE) with debootstrap (no $(DEFAULT_BASE) here)"; \
	    mirror=$$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | grep -v security | awk '{print $$2; exit}'); \
	    [ -n "$$mirror" ] || mirror=$$(awk '$$1 == "deb" && !/security/ {print $$2; exit}' /etc/apt/sources.list); \
	    rootfs=$$(mktemp -d) && trap 'rm -rf "$$rootfs"' EXIT && \
	    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
	        $(BASE_SUITE) "$$rootfs" "$$mirror" >"$$rootfs.log" 2>&1 \
	        || { tail -n 30 "$$rootfs.log"; rm -f "$$rootfs.log"; exit 1; }; \
	    rm -f "$$rootfs.log"; \
	    rm -rf "$$rootfs"/var/cache/apt/archives/*.deb "$$rootfs"/var/lib/apt/lists/* && \
	    tar -C "$$rootfs" -c . | $(DOCKER) import \
	        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
	        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - $(LOCAL_BASE) >/dev/null && \
	    echo "base image: $(LOCAL_BASE) built"; \
	fi

# Wheels for the base image's Python (asked of the image itself), downloaded with the host's pip;
# requirements-*.txt list what each image installs from them: the balancer image gets the
# project's dependencies plus the optional packages named in IMAGE_EXTRAS (pinned with == in
# pyproject.toml), the replica image only what a replica imports.
IMAGE_EXTRAS    ?= prometheus-client
wheels: base-image | $(STAMP)  ## Download the images' Python packages as wheels, on the host
	@py=$$($(DOCKER) run --rm --network none --label hashlb.role=build $(BASE_IMAGE) \
	        python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])') && \
	stamp=$(WHEELS)/.downloaded-$$py && \
	if [ ! -f $$stamp ] || [ pyproject.toml -nt $$stamp ]; then \
	    mkdir -p $(WHEELS) && rm -f $(WHEELS)/*.whl $(WHEELS)/.downloaded-* && \
	    $(BIN)/python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
	        wanted = tuple(name + "==" for name in "$(IMAGE_EXTRAS)".split()); \
	        extras = [r for rs in p["optional-dependencies"].values() for r in rs if r.startswith(wanted)]; \
	        print("\n".join(sorted(set(p["dependencies"] + extras))))' >$(WHEELS)/requirements-lb.txt && \
	    grep -iE '^(flask|werkzeug|gunicorn)\b' $(WHEELS)/requirements-lb.txt >$(WHEELS)/requirements-server.txt && \
	    echo "wheels: downloading for Python $$py" && \
	    $(BIN)/pip download --quiet --disable-pip-version-check --dest $(WHEELS) \
	        --only-binary=:all: --python-version $$py -r $(WHEELS)/requirements-lb.txt && \
	    touch $$stamp; \
	else echo "wheels: up to date for Python $$py"; fi

build: wheels  ## Build the images: replica (hashlb-server), balancer/supervisor (hashlb-lb), etcd (hashlb-etcd)
	$(DOCKER) build --quiet --build-arg BASE_IMAGE=$(BASE_IMAGE) -f Dockerfile.server -t $(LB_IMAGE) .
	$(DOCKER) build --quiet --build-arg BASE_IMAGE=$(BASE_IMAGE) -f Dockerfile.lb -t $(LB_LB_IMAGE) .
	$(DOCKER) build --quiet --build-arg BASE_IMAGE=$(BASE_IMAGE) -t $(LB_ETCD_IMAGE) - <Dockerfile.etcd
	@for image in server lb etcd; do  # superseded builds (the venv stages stay: they are the cache) \
	    $(DOCKER) image prune --force --filter label=hashlb.image=$$image >/dev/null; done

up: build  ## Start the stack in Docker; returns when it serves on 127.0.0.1:5000 (LB_PUBLISH_PORT)
	$(COMPOSE_RUN) up -d --no-build
	@for _ in $$(seq 180); do \
	    python3 -c 'import json, urllib.request as u; o = u.build_opener(u.ProxyHandler({})); \
	        url = "http://127.0.0.1:$(LB_PUBLISH_PORT)"; \
	        n = json.load(o.open(url + "/rep", timeout=2))["message"]["N"]; \
	        n == 0 or o.open(url + "/home", timeout=2)' 2>/dev/null \
	        && { echo "serving on http://127.0.0.1:$(LB_PUBLISH_PORT)"; exit 0; }; \
	    sleep 0.5; \
	done; echo "not serving within 90s: see make logs" >&2; exit 1

down:  ## Remove the stack: replicas by label (also those /add started), then containers, network, volume
	-$(COMPOSE_RUN) stop --timeout 10
	@ids=$$($(REPLICAS_OF)); if [ -n "$$ids" ]; then \
	    $(DOCKER) stop --time 10 $$ids >/dev/null; $(DOCKER) rm --force $$ids >/dev/null; \
	    echo "removed $$(echo $$ids | wc -w) replica containers of deployment $(LB_DEPLOYMENT)"; fi
	$(COMPOSE_RUN) down --volumes --remove-orphans --timeout 10

logs:  ## Follow the balancer's and the supervisor's logs (Ctrl-C stops following)
	$(COMPOSE_RUN) logs --follow --tail=100

ps:  ## The stack's containers and its replicas
	$(COMPOSE_RUN) ps
	@$(DOCKER) ps --all --filter label=hashlb.deployment=$(LB_DEPLOYMENT) --filter label=hashlb.role=replica \
	    --format 'table {{.Names}}\t{{.Status}}\t{{.Label "hashlb.server_id"}}\t{{.ID}}'

docker-clean: down  ## down, then remove the images (not the base) and the downloaded wheels
	-$(DOCKER) image rm $(LB_IMAGE) $(LB_LB_IMAGE) $(LB_ETCD_IMAGE)
	$(DOCKER) image prune --force --filter label=hashlb.image >/dev/null
	rm -rf $(WHEELS)
