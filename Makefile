# Every user-facing target does its own set-up: a fresh clone needs nothing but `make test` or `make demo`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: setup mosquitto test lint typecheck imports pytest demo bench contracts slither clean

setup: $(STAMP) node_modules/.installed mosquitto

# The MQTT broker the bridge tests start (Debian package; the package starts no service).
mosquitto:
	@command -v mosquitto >/dev/null || test -x /usr/sbin/mosquitto || \
	  { if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq mosquitto; \
	    else echo "mosquitto missing: run 'sudo apt-get install -y mosquitto'" >&2; exit 1; fi; }

# torch's CPU wheel lies on this machine's disk; installing it first stops pip pulling a CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

# solc-js, OpenZeppelin and anvil come from npm, pinned by package-lock.json.
node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch node_modules/.installed

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

imports: $(STAMP)
	$(VENV)/bin/lint-imports

pytest: setup
	$(VENV)/bin/pytest -n 2 --dist loadfile

test: lint typecheck imports pytest

demo: setup
	$(VENV)/bin/microgrid demo

bench: setup
	$(VENV)/bin/microgrid bench powerflow
	$(VENV)/bin/microgrid bench env

contracts: setup
	$(PY) -m contracts.compile

# slither over the contract suite through a solc shim over solc-js (~2 min; docs/security.md).
slither: setup
	$(PY) -m contracts.slither_check

clean:
	rm -rf $(VENV) node_modules .pytest_cache .mypy_cache .ruff_cache
