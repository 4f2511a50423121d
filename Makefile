# The two commands of the README are `make demo` and `make test`; everything else is a helper.
# A fresh machine needs Python >= 3.11, Java 17 and Maven; the rest is installed here.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
GATED  := pipeline devkit tests bench

.PHONY: install test check lint format lock wheel-check demo up down kafka-up kafka-down kafka-jars bench clean

# reinstalled whenever pyproject.toml changes (the stamp's name carries its checksum)
$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required")'
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

install: $(STAMP)

kafka-jars: install
	$(PY) -m devkit kafka fetch

## Run every test (unit, integration on a real broker, end-to-end with processes + simulators),
## after the fast gates of `make check`.
## The end-to-end tests mostly wait (on simulators, brokers, retries): PYTEST_WORKERS processes
## share them, one test file per worker at a time, each worker with its own broker. The tests
## marked `serial` (they compare latencies or time-outs within the run) run alone afterwards.
PYTEST_WORKERS ?= 3
test: check kafka-jars
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile -m "not serial" --durations=25
	$(PY) -m pytest -q -m serial --durations=5

## The gates, in seconds: lint, format, types, import contracts (pyproject.toml configures each).
## Every gate runs; the target fails if any failed.
CHECKS := "ruff check $(GATED)" "ruff format --check $(GATED)" "mypy pipeline" "lint-imports --no-logo"
check: install
	@failed=""; for gate in $(CHECKS); do \
		echo "$(VENV)/bin/$$gate"; $(VENV)/bin/$$gate || failed="$$failed\n  $$gate"; \
	done; \
	if [ -n "$$failed" ]; then printf "make check: failed:$$failed\n" >&2; exit 1; fi

lint: install
	$(VENV)/bin/ruff check $(GATED)

format: install
	$(VENV)/bin/ruff format $(GATED)
	$(VENV)/bin/ruff check --fix $(GATED)

## The deploy lock (runtime dependencies only) and the development lock, from pyproject.toml.
lock: install
	$(VENV)/bin/uv pip compile pyproject.toml --generate-hashes --python-version 3.11 \
		--custom-compile-command 'make lock' -q -o requirements.lock
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --generate-hashes --python-version 3.11 \
		--custom-compile-command 'make lock' -q -o requirements-dev.lock

## Build the wheel, install it from the lock into a clean venv, run it. `make test` runs it with
## its broker (tests/integration/test_wheel.py); here the service step needs KAFKA_BOOTSTRAP.
wheel-check: install
	PYTHON=$(PY) .ci/wheel-check

## The deployment files, without a cluster: kustomize build of deploy/k8s, every object against its
## schema, promtool check and test of deploy/prometheus, the dashboard's PromQL (docs/operations.md).
.PHONY: check-deploy
check-deploy:
	.ci/check-deploy

## The production deploy in real containers (README "Deploy"), on a machine without Docker: podman,
## images on Debian bases, the compose stack with the simulators, traffic, kills, down/up, replay.
.PHONY: test-containers
test-containers: install
	PYTHON=$(PY) .ci/containers-test

## Run the demo: local broker, simulators, every service, a scripted day, a summary.
demo: kafka-jars
	$(PY) -m devkit demo $(DEMO_ARGS)

## The local profile: broker, both simulators and every service in the background (logs in
## .run/local/logs); README "One call end to end". `make down` stops exactly what it started.
up: kafka-jars
	$(PY) -m devkit up

down: install
	$(PY) -m devkit down

kafka-up: kafka-jars
	$(PY) -m devkit kafka up

kafka-down: install
	$(PY) -m devkit kafka down

# every benchmark, about 10 minutes in all; each ends with a summary table (docs: README "Benchmarks")
bench: kafka-jars
	$(PY) bench/loop_throughput.py --records 100000 --rounds 2
	$(PY) bench/processor_throughput.py --events 50000 --rounds 2
	$(PY) bench/processor_scaling.py --events 60000
	$(PY) bench/ingest_webhooks.py
	$(PY) bench/end_to_end_latency.py --rate 50 --seconds 20
	$(PY) bench/end_to_end_latency.py --rate 200 --seconds 20
	$(PY) bench/retry_efficiency.py --calls 100
	$(PY) bench/import_pace.py --customers 1000 --scale 100

clean:
	rm -rf .run .pytest_cache .ruff_cache .mypy_cache .import_linter_cache build dist
