# Two commands: `make test` and `make lab` (see README.md). Both run the
# idempotent set-up first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test unit lint lab lab-down bench bench-quick clean

setup:
	@scripts/setup.sh

lint: setup
	@echo "==> ruff"
	@$(VENV)/bin/ruff check overlay tests

test: setup lint
	@echo "==> pytest"
	@$(PY) -m pytest $(PYTEST_ARGS)

unit: setup
	@$(PY) -m pytest tests/unit -q

lab: setup
	@$(VENV)/bin/overlay lab up
	@$(VENV)/bin/overlay lab check

lab-down: setup
	@$(VENV)/bin/overlay lab down

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
