# One command to run the system, one to test it. The virtual environment is made on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: help venv run test test-fast lint typecheck clean

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

test: $(STAMP)  ## Run the whole test suite
	$(BIN)/pytest

test-fast: $(STAMP)  ## Run the tests that start no processes
	$(BIN)/pytest -m "not system and not docker"

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check lb replica supervisor tests

typecheck: $(STAMP)  ## mypy
	$(BIN)/mypy lb replica supervisor

clean:  ## Remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info

-include docker.mk
