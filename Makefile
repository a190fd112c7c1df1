# ds-gateway: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
RUN_STAMP := $(VENV)/.run-stamp
STAMP := $(VENV)/.installed-stamp
E2E_STAMP := e2e/node_modules/.installed-stamp
PORT ?= 4437

.DEFAULT_GOAL := help

help: ## List the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-14s %s\n", $$1, $$2}'

# The venv gets uv (a PyPI wheel) as its installer: it installs the package in
# seconds where pip takes half a minute. Without a pip for $(PYTHON), pip is
# bootstrapped into the venv instead.
$(UV):
	@$(PYTHON) -m venv --without-pip $(VENV)
	@if $(PYTHON) -m pip --version >/dev/null 2>&1; then \
	    $(PYTHON) -m pip --python $(PY) install -qq --disable-pip-version-check uv; \
	else $(PYTHON) -m venv $(VENV) && $(PY) -m pip install -qq --disable-pip-version-check uv; fi

# `make run` needs the package and its embedded servers, nothing more.
$(RUN_STAMP): pyproject.toml | $(UV)
	@$(UV) pip install -q --python $(PY) -e '.[embedded]'
	@touch $(RUN_STAMP)

$(STAMP): pyproject.toml | $(UV)
	$(UV) pip install -q --python $(PY) -e '.[test]'
	touch $(STAMP)

$(E2E_STAMP): e2e/package.json e2e/package-lock.json
	cd e2e && npm ci --no-audit --no-fund --loglevel=error
	touch $(E2E_STAMP)

install: $(STAMP) $(E2E_STAMP) ## Create .venv and install the package, test tools and the pinned npm suite

run: $(RUN_STAMP) ## Run everything on 127.0.0.1:$(PORT): gateway, workers, embedded Redis and Postgres in ./data
	@$(VENV)/bin/dsgw dev --port $(PORT)

serve: $(RUN_STAMP) ## Run only the gateway against REDIS_URL
	$(VENV)/bin/dsgw serve --port $(PORT)

test: install ## Unit, integration and conformance tests (starts its own Redis)
	$(PY) -m pytest tests

test-unit: $(STAMP) ## Unit tests only (no servers)
	$(PY) -m pytest tests/unit

test-integration: $(STAMP) ## Integration tests over HTTP against a real redis-server
	$(PY) -m pytest tests/integration

fuzz: $(STAMP) ## Property-based HTTP fuzzing of a real gateway: 20,000 requests (DSGW_FUZZ_EXAMPLES=N to change)
	DSGW_FUZZ_EXAMPLES=$${DSGW_FUZZ_EXAMPLES:-20000} $(PY) -m pytest tests/integration/test_fuzz.py -m fuzz -p no:cacheprovider

conformance: install ## The official conformance suite (npm, pinned 0.3.6) against a fresh gateway; prints the counts
	$(PY) -m e2e.conformance

stack: install ## Start redis (STACK_REDIS=cluster for 3 masters), postgres, 3 gateways, nginx, workers in the background
	@$(PY) -m e2e.stack up

stack-down: ## Stop exactly what `make stack` started
	@$(PY) -m e2e.stack down

e2e: install ## Through the load balancer on a 3-master cluster: conformance, cross-replica delivery, kills, drains, sync scenarios
	$(PY) -m pytest e2e -p no:cacheprovider

chaos: install ## The fault suite, one local stack per scenario, exact counts printed (~10 min; docs/chaos.md)
	$(PY) -m pytest e2e/chaos -o python_files='chaos_*.py' -p no:cacheprovider -s -v $(CHAOS_ARGS)

bench: install ## ds-gateway vs the reference server, same run, same load generator (~5 min; docs/performance.md)
	$(PY) -m e2e.bench_compare $(BENCH_ARGS)

bench-sync: install ## Postgres sink/source throughput and lag, with a same-run COPY baseline
	$(PY) -m e2e.bench_sync

soak: install ## Tiered history: Redis memory flat under steady appends to 1,000 streams, catch-up from -1 (10 min; SOAK_ARGS="--minutes 2")
	$(PY) -m e2e.soak_tiering $(SOAK_ARGS)

bench-replicas: install ## Live delivery same replica vs across replicas (3 replicas, 3-master cluster)
	$(PY) -m e2e.bench_fanout

bench-scale: install ## docs/scaling.md's cost model vs the local stack on 1 and 3 masters; Redis and Postgres bytes per message (SCALE_ARGS="--seconds 5")
	$(PY) -m e2e.bench_scale $(SCALE_ARGS)

# The image the compose file, deploy/k8s and the Helm chart name: ds-gateway:<version in pyproject.toml>.
IMAGE ?= ds-gateway:$(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

image: ## Build the Docker image $(IMAGE) (gateway and workers) from deploy/Dockerfile
	docker build -f deploy/Dockerfile -t $(IMAGE) .

lint: $(STAMP) ## ruff and mypy
	$(VENV)/bin/ruff check gateway workers tests e2e
	$(VENV)/bin/ruff format --check gateway workers tests e2e
	$(VENV)/bin/mypy gateway workers

format: $(STAMP) ## Apply ruff's formatting and safe fixes
	$(VENV)/bin/ruff check --fix gateway workers tests e2e
	$(VENV)/bin/ruff format gateway workers tests e2e

clean: ## Remove the virtualenv, node_modules and caches (keeps ./data)
	rm -rf $(VENV) e2e/node_modules e2e/bench/node_modules .pytest_cache .mypy_cache .ruff_cache

.PHONY: help install image run serve test test-unit test-integration fuzz conformance stack stack-down e2e chaos bench bench-sync soak bench-replicas bench-scale lint format clean
