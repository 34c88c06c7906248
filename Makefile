# make help: what each target does. `make train` and `make test` set everything up first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
ARGS ?=
APT := DEBIAN_FRONTEND=noninteractive apt-get

.DEFAULT_GOAL := help
.PHONY: help install browser train test bench lint format tensorboard clean gpu-wheels

help: ## show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-12s %s\n", $$1, $$2}'

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(INSTALLED) ## create .venv and install the package with its dev tools (again only when pyproject.toml changes)

train: install ## train ResNet-18 on ChestMNIST, 100 epochs (downloads the data once); overrides: make train ARGS="trainer.max_epochs=10"
	$(BIN)/python -m chest_mnist.train $(ARGS)

# tests/test_app.py drives the web page in Debian's Chromium (Playwright's own browser download
# needs a network CI does not have); apt-get update only when the install fails without it
browser: ## install Chromium for the browser tests, when it is missing (Debian, as root)
	command -v chromium >/dev/null || $(APT) install -y chromium || \
	  { $(APT) update && $(APT) install -y chromium; }

# one pytest worker per core (pytest-xdist), each with one torch thread (tests/conftest.py):
# most of a test's time is Python, imports and compiles, which one process runs on one core;
# worksteal: a worker that is done takes tests from the other's queue. ARGS="-n 0": one process
test: install browser ## run the test suite (offline, CPU), one worker per core
	$(BIN)/python -m pytest -n auto --dist worksteal $(ARGS)

bench: install ## time our pipeline against the classic per-sample loop; options: make bench ARGS="--size 224 --steps 10"
	$(BIN)/python -m chest_mnist.bench $(ARGS)

lint: install ## ruff: lint and format check
	$(BIN)/ruff check chest_mnist tests benchmarks
	$(BIN)/ruff format --check chest_mnist tests benchmarks

format: install ## ruff: fix what can be fixed, format
	$(BIN)/ruff check --fix chest_mnist tests benchmarks
	$(BIN)/ruff format chest_mnist tests benchmarks

tensorboard: install ## TensorBoard on every run and sweep under logs/
	$(BIN)/tensorboard --logdir logs

gpu-wheels: install ## the packages a bare GPU image lacks, as wheels in .whl/ (benchmarks/gpu_lib.sh installs them)
	$(BIN)/python -m pip wheel --quiet --no-deps --wheel-dir .whl \
	  $$($(BIN)/python -m pip list --format=freeze | grep -iE '^(hydra-core|omegaconf|antlr4-python3-runtime|medmnist|captum|pydicom)==')

clean: ## remove caches and build files; keeps .venv, logs/ (your runs) and data/
	rm -rf .pytest_cache .ruff_cache *.egg-info build
	find . -name __pycache__ -type d -not -path './.venv/*' -prune -exec rm -rf {} +
