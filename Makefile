# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_PROMPT ?= What is the capital of France? Who wrote Romeo and Juliet? Write a haiku about the sea.

.PHONY: demo test bench stop

$(BIN)/homeskillet: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install -e '.[dev]'
	touch $@

demo: $(BIN)/homeskillet
	$(BIN)/homeskillet run "$(DEMO_PROMPT)"
	$(BIN)/homeskillet allocations

test: $(BIN)/homeskillet
	$(BIN)/pytest

bench: $(BIN)/homeskillet
	$(BIN)/homeskillet bench-overhead

stop: $(BIN)/homeskillet
	$(BIN)/homeskillet server stop
