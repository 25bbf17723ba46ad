# One-command set-up: a virtual environment with the CPU torch wheel installed first (so nothing
# pulls a CUDA build), then the package. With a GPU: make test TORCH="torch==2.13.0" TORCH_ARGS="--index-url …"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.layercrit-installed
PYTEST_ARGS ?=

.PHONY: setup browser demo test lint bench clean

setup: $(STAMP)

# Debian's Chromium for the report's browser test (skipped, with a reason, where it cannot be installed).
browser:
	@command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium could not be installed: the browser test will be skipped"

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH)" $(TORCH_ARGS)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/layercrit demo --out demo-out

test: setup browser
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) demo-out build src/*.egg-info .pytest_cache
