# Two commands do all the set-up: `make train` (the main job) and `make test` (the whole suite).
# Both create .venv on first use with the pinned torch build (2.13.0: a CPU wheel on this machine,
# the normal CUDA-enabled build elsewhere).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION := 2.13.0

$(BIN)/gptlab: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e ".[test]"
	touch $(BIN)/gptlab

.PHONY: setup train test lint bench
setup: $(BIN)/gptlab

train: setup
	$(BIN)/gptlab train

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/pip install -q --no-deps llms-from-scratch==1.0.19
	$(BIN)/python -m bench --quick
