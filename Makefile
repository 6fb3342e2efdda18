# One command to run the system, one to test it. The virtual environment is made on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: help venv run run-ha test test-fast lint typecheck settings-table clean

help:  ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,analysis,ops]'
	touch $@

venv: $(STAMP)  ## Create .venv and install the project with its pinned dependencies

run: $(STAMP)  ## Run balancer + supervisor + 3 local replicas on http://127.0.0.1:5000 (Ctrl-C stops all)
	$(BIN)/lb-run

run-ha: $(STAMP)  ## Run 3 etcd members, 2 supervisors, balancers on :5000-5002, 3 replicas (needs etcd)
	@command -v etcd >/dev/null || { echo "etcd is not installed: apt-get install etcd-server (Debian)"; exit 1; }
	$(BIN)/lb-ha

test: $(STAMP)  ## Run the whole test suite
	$(BIN)/pytest

test-fast: $(STAMP)  ## Run the tests that start no processes
	$(BIN)/pytest -m "not system and not docker"

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check lb replica supervisor tests examples

typecheck: $(STAMP)  ## mypy
	$(BIN)/mypy lb replica supervisor examples

settings-table: $(STAMP)  ## Rewrite the README's settings table from lb/settings.py
	$(BIN)/python -c 'import re, pathlib; from lb.settings import settings_table as t; \
	p = pathlib.Path("README.md"); s = p.read_text(); \
	p.write_text(re.sub(r"(<!-- settings:start -->).*(<!-- settings:end -->)", \
	lambda m: m.group(1) + "\n" + t(markdown=True) + "\n" + m.group(2), s, flags=re.S))'

clean:  ## Remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info

-include docker.mk
-include swarm.mk
-include bench/bench.mk
