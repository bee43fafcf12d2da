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

lint:
	$(VENV)/bin/ruff check upcycle tests
