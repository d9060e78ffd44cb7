# Two commands: `make install` builds .venv with everything, `make test` runs every check.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install test lint bench clean

install:
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "mgpumanager needs Python 3.11+"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# compat mode puts the source tree on sys.path, so twistd sees twisted/plugins/
	$(BIN)/python -m pip install --quiet --config-settings editable_mode=compat -e '.[test]'
	$(BIN)/twistd --help | grep -q mgpumanager

lint:
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# The suite mostly waits on the programs it spawns (twistd, HAProxy, Prometheus,
# Chromium, simulated servers), so four workers finish it sooner even on 2 cores.
TEST_WORKERS ?= 4

test: lint
	$(BIN)/python -m pytest -q -rs -n $(TEST_WORKERS)

bench:
	bench/setup.sh
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info twisted/plugins/dropin.cache
