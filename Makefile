# ccos-obsd: `make run` starts the daemon, `make test` runs every check.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: tools run test lint typecheck unit bench soak clean

$(STAMP): pyproject.toml | tools
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,lint]'
	touch $(STAMP)

# The Debian packages missing for `make run` (python3-venv), and for `make test` those every
# test uses too (prometheus, sqlite3, socat, ...): scripts/ensure-tools installs them when run
# as root, and otherwise stops naming the apt-get command. It runs before the venv is made,
# which needs python3-venv, and only once per make: one list, one apt-get update.
tools:
	@PYTHON=$(PYTHON) scripts/ensure-tools $(if $(filter test,$(MAKECMDGOALS)),test,run)

run: $(STAMP)
	$(BIN)/ccos-obsd run --config config/ccos-obsd.toml

test: $(STAMP)
	$(BIN)/ruff check ccos_obsd tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest

# matplotlib, for the plots, only where benchmarks run.
BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,lint,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench

# The fault tests at length: 500 SIGKILLs under load, 5000 fuzzed examples per property
# (`make test` runs 20 and 250). A failing crash run prints CCOS_CRASH_SEED to replay it.
soak: $(STAMP)
	CCOS_CRASH_ITERATIONS=500 CCOS_FUZZ_EXAMPLES=5000 $(BIN)/python -m pytest -q tests/e2e/test_crash.py tests/e2e/test_fuzz.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
