# The few verbs people type. CI runs `make test` through .ci/run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint unit bench mosquitto promtool clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

mosquitto:
	@scripts/ensure-mosquitto.sh

promtool:
	@scripts/ensure-promtool.sh

## demo: DTB + BTD between two throwaway brokers, live counts, summary with lost = 0.
## DEMO_ARGS=--keep keeps the worker configs and logs and prints where they are.
demo: $(STAMP) mosquitto
	$(PY) -m bench.demo $(DEMO_ARGS)

## bench: no bridge vs Mosquitto's bridge vs ours (1 and 2 workers): msg/s, latency, CPU,
## RSS, lost/dup; the shapes users run (IoT Core pool, 500 routes, QoS 0 flood, archive
## modes, Mosquitto's bridge in and out, added latency, pacing on the wire); a 1M-message
## target-down memory run; ~10 min. BENCH_ARGS=--quick: ~4 min.
bench: $(STAMP) mosquitto
	@$(PY) -c 'import matplotlib, psutil' 2>/dev/null || $(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m bench.run $(BENCH_ARGS)

## test: lint, type check, then every test (real Mosquitto processes on free ports, and
## promtool for the alert rules' unit tests)
test: lint $(STAMP) mosquitto promtool
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check bridge tests bench
	$(VENV)/bin/ruff format --check bridge tests bench
	$(VENV)/bin/mypy

## unit: the fast tests only (no brokers)
unit: $(STAMP)
	$(PY) -m pytest tests/test_routing.py tests/test_config.py tests/test_codec.py \
	    tests/test_urls.py tests/test_archive_reader.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
