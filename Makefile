# Thin wrappers. Every target bootstraps .venv on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: all demo test lint bench tools clean

all: test

$(STAMP): workloads/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch 2.13.0; a bare "torch" would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e 'workloads[ml,test]'
	touch $@

venv: $(STAMP)

# Debian test tools (promtool, pushgateway) and the chart README generator, where root
# and apt are available; tests that need them skip and say why elsewhere.
tools: $(STAMP)
	bash ci/scripts/install-test-tools.sh

demo: $(STAMP)
	$(VENV)/bin/trajflow demo-data --out .trajflow/demo-source --episodes 96 --seed 0
	$(VENV)/bin/trajflow run -f values/local.yaml

test: tools
	$(PY) -m pytest tests $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m pytest tests/charts -k "lint" $(PYTEST_ARGS)

bench: tools
	$(VENV)/bin/trajflow bench --out benchmarks/results

clean:
	rm -rf $(VENV) .trajflow
