# Every target sets up what it needs: a fresh clone only needs python3 (>= 3.10) and make.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= $(HOME)/.cache/llmctl-dev
DEMO_MODEL := $(DEMO_DIR)/SmolLM2-135M-Instruct.Q4_1.gguf
DEMO_HOME := $(DEMO_DIR)/demo-home
export LLMCTL_DEMO_MODEL := $(DEMO_MODEL)
# llama.cpp's own tools (llama-server, ggml-rpc-server, llama-bench, llama-fit-params), built once per machine
export LLMCTL_ENGINE_DIR ?= $(DEMO_DIR)/engine

.PHONY: setup llama-cpp engine demo lint test bench bench-compare docs clean

# llama-cpp-python is compiled once per machine and CMAKE_ARGS into $(DEMO_DIR)/wheels
# (see tools/llama_wheel.py), not taken from pip's cache, which would hand one CPU's
# native build to another. Runs every time (a no-op when the right wheel is installed),
# so `CMAKE_ARGS=... make setup` switches the build, and always before the install below.
llama-cpp:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) tools/llama_wheel.py --cache $(DEMO_DIR) --venv-python $(PY) >/dev/null

# Reinstalls only when pyproject.toml changes.
$(STAMP): pyproject.toml | llama-cpp
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

$(DEMO_MODEL): | $(STAMP)
	$(PY) tools/demo_model.py --dest $(DEMO_DIR)

# Builds llama.cpp's tools from the llama.cpp the wheel vendors, with the wheel's CMAKE_ARGS (a no-op once built).
engine: $(STAMP)
	CMAKE_ARGS="$$(cat $(VENV)/.llama-cmake-args 2>/dev/null)" $(VENV)/bin/llmctl engine install >/dev/null

setup: llama-cpp $(STAMP) $(DEMO_MODEL) engine

# The main job on the demo model, in a demo store of its own (your models are untouched).
demo: setup
	rm -rf $(DEMO_HOME)
	LLMCTL_HOME=$(DEMO_HOME) $(VENV)/bin/llmctl import $(DEMO_MODEL) --name smollm2-demo
	LLMCTL_HOME=$(DEMO_HOME) $(VENV)/bin/llmctl list
	LLMCTL_HOME=$(DEMO_HOME) $(VENV)/bin/llmctl show smollm2-demo
	LLMCTL_HOME=$(DEMO_HOME) $(VENV)/bin/llmctl hwinfo
	LLMCTL_HOME=$(DEMO_HOME) $(VENV)/bin/llmctl fit smollm2-demo
	LLMCTL_HOME=$(DEMO_HOME) $(VENV)/bin/llmctl fit smollm2-demo --hw-profile rtx4060-16gb --ctx 4096
	LLMCTL_HOME=$(DEMO_HOME) $(VENV)/bin/llmctl run smollm2-demo "What is the capital of France? Answer in one word." --temperature 0 --seed 1 --verbose
	printf 'My name is Ada.\nWhat is my name?\n' | LLMCTL_HOME=$(DEMO_HOME) $(VENV)/bin/llmctl chat smollm2-demo --temperature 0 --max-tokens 40
	LLMCTL_HOME=$(DEMO_HOME) $(VENV)/bin/llmctl bench smollm2-demo -p 128 -n 32 -r 3 -o md

# ruff (lint, import order, format) and mypy, as configured in pyproject.toml; `make test`, and so CI, runs it first.
lint: $(STAMP)
	$(VENV)/bin/ruff check llmctl tests tools benchmarks docs
	$(VENV)/bin/ruff format --check llmctl tests tools benchmarks docs
	$(VENV)/bin/mypy

test: setup lint
	$(PY) -m pytest

bench: setup
	$(PY) benchmarks/run_all.py

# llmctl bench against native llama-bench built from the same llama.cpp (built once, cached in $(DEMO_DIR)).
bench-compare: setup
	$(PY) benchmarks/run_all.py --compare-only

# Regenerates docs/commands.md from the commands' --help (a test fails when it is stale).
docs: $(STAMP)
	$(PY) tools/gen_commands.py > docs/commands.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
