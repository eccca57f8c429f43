# Thin wrappers. Every target bootstraps .venv on a fresh machine (no stdin needed).
#   make test     the whole suite (installs the Debian test tools where root and apt allow)
#   make demo     the pipeline on this machine on a generated dataset
#   make bench    benchmarks -> benchmarks/results/ (BENCH=storage for one, BENCH_ARGS=--quick)
#   make lint     chart lint tests only
#   make schema   rewrite the charts' values.schema.json from the config models
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch is pinned: pip takes the CPU build of this release where it lies on disk, and a
# bare "torch" would pull a multi-GB CUDA build.
TORCH := torch==2.13.0
PYTEST_ARGS ?=
BENCH ?=
BENCH_ARGS ?=

.PHONY: all venv tools demo test lint bench schema clean

all: test

$(STAMP): workloads/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q '$(TORCH)'
	$(PY) -m pip install -q -e 'workloads[ml,test]' '$(TORCH)'
	touch $@

venv: $(STAMP)

# Debian test tools (promtool, pushgateway), the chart README generator and checkov, where
# this machine allows; tests that need a missing tool skip and say why.
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
	$(VENV)/bin/trajflow bench $(BENCH) --out benchmarks/results $(BENCH_ARGS)

schema: $(STAMP)
	$(PY) ci/scripts/sync_config_schema.py

clean:
	rm -rf $(VENV) .trajflow
