# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the CPU suite).
# Both create .venv on first use: torch 2.13.0 (the CPU build on CPU machines), this package
# with its dev/serve/qat extras, and vLLM 0.28 without its CUDA-only dependencies.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.bitbybit-installed

.PHONY: demo test install

install: $(STAMP)

$(STAMP): pyproject.toml requirements/vllm-0.28-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip>=23" "setuptools>=77" wheel
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,serve,qat]"
	$(BIN)/pip install -q --no-deps vllm==0.28.0
	$(BIN)/pip install -q -r requirements/vllm-0.28-cpu.txt
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m qat.run

test: $(STAMP)
	$(BIN)/python -m pytest
