# Two commands: `make test` and `make lab` (see README.md). Both run the
# idempotent set-up first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test unit lint lab lab-down bench bench-quick mutate clean

setup:
	@scripts/setup.sh

lint: setup
	@echo "==> ruff"
	@$(VENV)/bin/ruff check overlay tests examples/plugins

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

# Benchmarks (bench/, docs/benchmarks.md): the full run (~30 min) and a subset (<5 min).
# Both write bench/results/latest.json and bench/results/*.png; the full run also
# rewrites the generated part of docs/benchmarks.md. BENCH_ARGS passes options
# (e.g. BENCH_ARGS="--suites conn_setup,rr").
bench:
	@scripts/bench-setup.sh
	@mkdir -p bench/bin && gcc -O2 -Wall -Wextra -pthread -o bench/bin/ovlbench bench/src/ovlbench.c
	@$(PY) -m bench run --profile full $(BENCH_ARGS)

bench-quick:
	@scripts/bench-setup.sh
	@mkdir -p bench/bin && gcc -O2 -Wall -Wextra -pthread -o bench/bin/ovlbench bench/src/ovlbench.c
	@$(PY) -m bench run --profile quick $(BENCH_ARGS)

# Mutation testing of the pure core (docs/testing.md): not part of `make test` (an hour or
# more); FILES="overlay/guard.py ..." picks targets, MUTATE_FLAGS=--resume tests only the last
# run's survivors again, MUTATE_JOBS (default 2, one per core) files run at once. Scores go to
# build/mutate/results.json.
MUTATE_JOBS ?= 2
mutate: setup
	@$(PY) scripts/mutate.py --jobs $(MUTATE_JOBS) $(MUTATE_FLAGS) $(FILES)

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
