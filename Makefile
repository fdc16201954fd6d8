# The two set-up commands: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# `pip install hkstore` alone is the store and the CLI (no jax); the demo needs the wrapper.
install: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[haiku,sign]'

install-dev: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'

demo: install
	XLA_FLAGS=--xla_force_host_platform_device_count=2 $(BIN)/python tools/demo.py

# lint, types, the suite (doctests included) on this checkout, then the built wheel: bare (no
# jax: inspect/verify work) and with the suite run against it in a fresh venv.
test: install-dev
	$(BIN)/ruff check hkstore tests tools
	$(BIN)/mypy
	$(BIN)/python -m pytest
	$(BIN)/python tools/wheel_check.py

# Benchmarks need declearn (the `bench` extra): it lives in its own venv, never in .venv.
BENCH_VENV := .venv-bench
$(BENCH_VENV)/bin/python:
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip

bench: $(BENCH_VENV)/bin/python
	$(BENCH_VENV)/bin/python -m pip install --quiet -e '.[dev,bench]'
	$(BENCH_VENV)/bin/python tools/bench.py --json bench.json

clean:
	rm -rf $(VENV) $(BENCH_VENV) .pytest_cache .mypy_cache .ruff_cache
