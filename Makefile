# Two entry points for a fresh machine: `make run` (main job) and `make test` (whole suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint env

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: the local CPU wheel; an unpinned torch resolves to a CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test,sd,launchers]'
	touch $@

env: $(BIN)/.installed

run: $(BIN)/.installed
	$(BIN)/python -m experiments.main

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

lint: $(BIN)/.installed
	$(BIN)/ruff check .
