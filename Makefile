# opsloop — every target the README names. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export OPSLOOP_HOME ?= $(CURDIR)/.opsloop
export PREFECT_HOME ?= $(OPSLOOP_HOME)/prefect
export PREFECT_API_URL ?= http://127.0.0.1:$(or $(OPSLOOP_PREFECT_PORT),4200)/api
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 60
export PYTHONPATH := $(CURDIR)
export OPSLOOP_REPO := $(CURDIR)

UV := $(shell command -v uv 2>/dev/null || echo "python3 -m uv")
RUN := $(UV) run --frozen --no-sync
PYTEST_ARGS ?=
# the suite waits on real servers and worker processes much of the time, so two pytest workers (each with
# its own Postgres, Prefect server and MLflow) run test files side by side
TEST_WORKERS ?= 2

.PHONY: help setup demo deploy stack-up stack-down stack-status bootstrap test test-fast lint typecheck security \
        bench bench-load clean

help: ## list targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

setup: ## install uv (if missing) and the locked environment into .venv
	@command -v uv >/dev/null 2>&1 || python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --frozen --all-extras --compile-bytecode

demo: setup stack-up bootstrap ## seed/advance demo data, deploy, run the nightly deployment on the local worker
	$(RUN) python -m deployments.demo

deploy: ## (re)create the local deployments from prefect.yaml (pool opsloop-local)
	$(RUN) python -m deployments.deploy local

stack-up: ## start Postgres, Prefect server + worker, MLflow, CRM sandbox (idempotent)
	$(RUN) opsloop stack up

stack-down: ## stop the local stack
	$(RUN) opsloop stack down

stack-status: ## show what runs
	$(RUN) opsloop stack status

bootstrap: ## register block types, create local block documents and the work pool
	$(RUN) python -m deployments.bootstrap

lint: ## ruff lint + format check
	$(RUN) ruff check .
	$(RUN) ruff format --check .

typecheck: ## mypy on the core (disallow_untyped_defs)
	$(RUN) mypy

security: ## bandit over the shipped code, fail on high severity
	$(RUN) bandit -q -r src/opsloop flows tasks blocks -lll

test: setup test-deps lint typecheck security ## the full suite (what CI runs)
	$(RUN) pytest -n $(TEST_WORKERS) --dist loadfile --durations=25 $(PYTEST_ARGS)

test-fast: ## inner loop: unit + contract tests, no slow/e2e
	$(RUN) pytest -m "not slow and not e2e" -x -q $(PYTEST_ARGS)

test-deps: ## system packages and sidecar venvs the tests start (idempotent)
	@bash tests/support/install_test_deps.sh

bench: setup ## benchmarks → docs/benchmarks.md
	$(RUN) python -m benchmarks.run_all

LOAD_ARGS ?= --customers 1000000 --transactions 10000000
bench-load: setup ## the nightly flow on 1M customers / 10M transactions (own stack; ~1 h) → docs/benchmarks.md
	$(RUN) python -m benchmarks.load $(LOAD_ARGS)

clean: stack-down ## stop the stack and delete local data
	rm -rf $(OPSLOOP_HOME)
