# The two set-up commands: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-declearn test-flower bench install install-dev clean

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
# jax: inspect/verify work) and with the suite run against it in a fresh venv; then the
# declearn and Flower integrations, each in venvs of their own. The test extra holds the cloud
# extra and moto[server]: the object-storage tests start moto's S3 server on 127.0.0.1.
test: install-dev
	$(BIN)/ruff check hkstore tests tools examples conftest.py
	$(BIN)/mypy
	$(BIN)/python -m pytest
	$(BIN)/python tools/wheel_check.py
	$(MAKE) test-declearn
	$(MAKE) test-flower

# The declearn integration: its own venv, pinned to declearn 2.9.1 (the version its guard is
# checked against); its tests, the doctests of the engine modules, then declearn's own unit
# tests for its Haiku model and jax vector run against hkstore's (tools/declearn_suite.py).
DECLEARN_VENV := .venv-declearn
DECLEARN_VERSION := 2.9.1
$(DECLEARN_VENV)/bin/python:
	$(PYTHON) -m venv $(DECLEARN_VENV)
	$(DECLEARN_VENV)/bin/python -m pip install --quiet --upgrade pip

test-declearn: $(DECLEARN_VENV)/bin/python
	$(DECLEARN_VENV)/bin/python -m pip install --quiet -e '.[declearn,test]' \
		'declearn[haiku,websockets]==$(DECLEARN_VERSION)'
	$(DECLEARN_VENV)/bin/python -m pytest tests/integration/declearn hkstore/integrations/declearn
	$(DECLEARN_VENV)/bin/python tools/declearn_suite.py --version $(DECLEARN_VERSION)

# The Flower integration, pinned to flwr 1.42.0 (the version its state table is written for):
# in .venv-flower (flwr without Ray) its tests -- runs through a grid double in one process,
# checkpointed, killed and resumed in fresh processes -- and the doctests of its modules; in
# .venv-flower-sim (flwr[simulation]: Ray) examples/flower run once through Flower's
# simulation engine, SIGKILLed after round 2 and resumed (wall times printed).
FLOWER_VENV := .venv-flower
FLOWER_SIM_VENV := .venv-flower-sim
FLOWER_VERSION := 1.42.0
$(FLOWER_VENV)/bin/python:
	$(PYTHON) -m venv $(FLOWER_VENV)
	$(FLOWER_VENV)/bin/python -m pip install --quiet --upgrade pip
$(FLOWER_SIM_VENV)/bin/python:
	$(PYTHON) -m venv $(FLOWER_SIM_VENV)
	$(FLOWER_SIM_VENV)/bin/python -m pip install --quiet --upgrade pip

test-flower: $(FLOWER_VENV)/bin/python $(FLOWER_SIM_VENV)/bin/python
	$(FLOWER_VENV)/bin/python -m pip install --quiet -e '.[flower,test]' 'flwr==$(FLOWER_VERSION)'
	$(FLOWER_VENV)/bin/python -m pytest tests/integration/flower hkstore/integrations/flower
	$(FLOWER_SIM_VENV)/bin/python -m pip install --quiet -e '.[flower-simulation,test]' \
		'flwr[simulation]==$(FLOWER_VERSION)'
	$(FLOWER_SIM_VENV)/bin/python -m pytest -s tests/integration/flower_simulation

# Benchmarks need declearn (the `bench` extra): it lives in its own venv, never in .venv.
BENCH_VENV := .venv-bench
$(BENCH_VENV)/bin/python:
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip

bench: $(BENCH_VENV)/bin/python
	$(BENCH_VENV)/bin/python -m pip install --quiet -e '.[dev,bench]'
	$(BENCH_VENV)/bin/python tools/bench.py --json bench.json

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(DECLEARN_VENV) $(FLOWER_VENV) $(FLOWER_SIM_VENV) \
		.pytest_cache .mypy_cache .ruff_cache
