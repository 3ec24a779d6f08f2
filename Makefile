# The few verbs people type. CI runs `make test` through .ci/run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint unit bench mosquitto clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

mosquitto:
	@scripts/ensure-mosquitto.sh

## demo: DTB + BTD between two throwaway brokers, live counts, summary with lost = 0
demo: $(STAMP) mosquitto
	$(PY) -m bench.demo

## test: lint, type check, then every test (real Mosquitto processes on free ports)
test: lint $(STAMP) mosquitto
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check bridge tests bench
	$(VENV)/bin/ruff format --check bridge tests bench
	$(VENV)/bin/mypy

## unit: the fast tests only (no brokers)
unit: $(STAMP)
	$(PY) -m pytest tests/test_routing.py tests/test_config.py tests/test_codec.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
