# moeflow: `make demo` runs the whole tiny pipeline; `make test` runs every test. Both install first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.moeflow-installed
# Quiet, offline-friendly defaults for the embedded Prefect API and MLflow.
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false
export TOKENIZERS_PARALLELISM := false

.PHONY: install browser demo test lint bench image clean

install: $(STAMP)

# Re-runs only when the dependency list changes; constraints.txt pins every version (torch to the CPU wheel).
$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing moeflow and its pinned dependencies into $(VENV) (first time: a few minutes)..."
	@$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
	@$(BIN)/python -c "import torch, prefect, mlflow, transformers" || { echo "install failed"; exit 1; }
	@touch $@

demo: install
	$(BIN)/moeflow pipeline --preset tiny

test: install browser
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

# make test runs the end-to-end file (the tiny pipeline and the UI story, ~19 min) on one worker from the
# start and the other test files on the other (pytest-xdist; tests/conftest.py puts tests/e2e first), to stay
# within 25 minutes on 2 cores.
# Headless Chromium (Debian's package) for the test that walks through the Prefect and MLflow UIs; Playwright
# (a dev dependency) drives it. Never `playwright install`: that would download another browser. PostgreSQL
# (Debian's package; initdb/pg_ctl only, no system service) for `moeflow up --cluster-like` and its test.
browser:
	@ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing postgresql (Debian package) for the cluster-like stack test..."; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >/dev/null 2>&1 \
	      || echo "could not install postgresql: the stack test will be skipped"; \
	  else echo "postgresql not found and not root: the stack test will be skipped"; fi; }
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (Debian package) for the UI test..."; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
	      || echo "could not install chromium: the UI test will be skipped"; \
	  else echo "chromium not found and not root: the UI test will be skipped"; fi; }

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python -m bench

image:
	docker build -f infra/docker/Dockerfile -t moeflow-job:$$(git rev-parse --short HEAD) .

clean:
	rm -rf .moeflow
