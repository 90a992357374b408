# Two set-up commands for a fresh machine: `make demo` and `make test`.
# Each creates .venv if absent. The pinned CPU torch is installed first so that pip does not
# resolve a multi-GB CUDA build; override TORCH_SPEC (e.g. TORCH_SPEC=torch) on a GPU machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= runs/demo
DEMO_PATIENTS ?= 2000
# CPU threads per process; empty = one (never oversubscribes a shared machine). `make demo THREADS=4`
THREADS ?=
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db

.PHONY: demo test lint bench clean install install-dev

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(PY) -m pipelines.demo --out $(DEMO_DIR) --n-patients $(DEMO_PATIENTS) $(if $(THREADS),--threads $(THREADS))

test: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check clinical_moe pipelines tests benchmarks
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadgroup tests

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check clinical_moe pipelines tests benchmarks
	$(VENV)/bin/ruff format --check clinical_moe pipelines tests benchmarks

bench: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m benchmarks.run_all

clean:
	rm -rf runs mlflow.db mlruns .pytest_cache
