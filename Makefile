# One-command set-up: a virtual environment with the CPU torch wheel installed first (so nothing
# pulls a CUDA build), then the package. With a GPU: make test TORCH="torch==2.13.0" TORCH_ARGS="--index-url …"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.layercrit-installed
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)" $(TORCH_ARGS)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/layercrit demo --out demo-out

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) demo-out build src/*.egg-info .pytest_cache
