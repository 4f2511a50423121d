# The two commands of the README are `make demo` and `make test`; everything else is a helper.
# A fresh machine needs Python >= 3.11, Java 17 and Maven; the rest is installed here.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install test demo kafka-up kafka-down kafka-jars lint bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required")'
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

install: $(STAMP)

kafka-jars: install
	$(PY) -m devkit kafka fetch

## Run every test (unit, integration on a real broker, end-to-end with processes + simulators).
test: kafka-jars
	$(PY) -m pytest -q

## Run the demo: local broker, simulators, every service, a scripted day, a summary.
demo: kafka-jars
	$(PY) -m devkit demo $(DEMO_ARGS)

kafka-up: kafka-jars
	$(PY) -m devkit kafka up

kafka-down: install
	$(PY) -m devkit kafka down

lint: install
	$(VENV)/bin/ruff check pipeline tests bench

bench: kafka-jars
	$(PY) bench/loop_throughput.py --records 100000 --rounds 2
	$(PY) bench/processor_throughput.py --events 50000 --rounds 2
	$(PY) bench/ingest_webhooks.py
	$(PY) bench/end_to_end_latency.py --rate 50 --seconds 20

clean:
	rm -rf .run .pytest_cache .ruff_cache
