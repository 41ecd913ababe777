# longrope: the two commands a new user needs are `make demo` and `make test`; both install first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU machine pins the CPU build (an unpinned torch pulls a multi-GB CUDA build).
# GPU users keep their own torch: `make install TORCH_SPEC=`
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# Busy-waiting OpenMP threads fight each other on shared CPUs (13x slower steps measured on 2 cores).
export OMP_WAIT_POLICY := PASSIVE
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1

.PHONY: install test test-unit test-integration demo lint bench gpu-check clean help recipe-llama2-2m

help:
	@echo "make help              this list"
	@echo "make install           create $(VENV) and install longrope (+ $(TORCH_SPEC))"
	@echo "make demo              the progressive LongRoPE pipeline on the bundled CPU test bed (recipes/tiny.yaml)"
	@echo "make test              unit + integration tests (GPU tests skip without a GPU)"
	@echo "make test-unit         fast unit tests only"
	@echo "make test-integration  integration tests only (end-to-end runs on the CPU test bed)"
	@echo "make lint              ruff"
	@echo "make bench             benchmarks (scripts/bench_*.py)"
	@echo "make gpu-check         on a CUDA machine: gpu tests, the tiny recipe on the GPU, 7B-shape memory bench"
	@echo "make clean             remove runs/, caches and build outputs (keeps $(VENV))"
	@echo "make recipe-<name>     run recipes/<name>.yaml through its stages"
	@echo "make recipe-llama2-2m  run recipes/llama2-7b-2m.yaml (LLaMA2-7B to a 2M-token window)"

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# -m "": every test; the gpu-marked ones skip themselves without CUDA (tests/conftest.py).
test: install
	$(PY) -m pytest -m "" $(PYTEST_ARGS)

test-unit: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-integration: install
	$(PY) -m pytest -m integration $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/longrope run recipes/tiny.yaml

lint: install
	$(VENV)/bin/ruff check src tests scripts

gpu-check: install
	scripts/gpu_check.sh

bench: install
	for script in scripts/bench_*.py; do echo "== $$script"; $(PY) $$script || exit 1; done

clean:
	rm -rf runs .pytest_cache build dist src/*.egg-info

recipe-llama2-2m: install
	$(VENV)/bin/longrope run recipes/llama2-7b-2m.yaml

recipe-%: install
	$(VENV)/bin/longrope run recipes/$*.yaml
