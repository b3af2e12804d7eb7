# Every target sets itself up: a venv in .venv with the project installed, plus the system
# packages it needs (redis-server for tests; wrk and nginx for benchmarks).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench check clean setup redis-server chromium

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/gateway demo

check: $(STAMP)
	$(BIN)/gateway check

test: $(STAMP) redis-server chromium lint
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check gateway middleware examples tests bench
	$(BIN)/ruff format --check gateway middleware examples tests bench
	$(BIN)/mypy

# The full run takes about 14 minutes; e.g. `make bench BENCH_ARGS="--targets issue8"` for a
# subset, BENCH_ARGS=--quick for a smoke test (see bench/README.md).
BENCH_ARGS ?=
bench: $(STAMP)
	bash bench/setup.sh
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# Tests start their own redis-server processes on free ports; this only makes sure the
# binary is there (Debian package).
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
		echo "installing redis-server (Debian package)"; \
		(apt-get update -qq || sudo apt-get update -qq) && \
		(DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server || \
		 sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server); }

# The dashboard test drives a real headless Chromium (Debian package).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
		echo "installing chromium (Debian package)"; \
		(apt-get update -qq || sudo apt-get update -qq) && \
		(DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium || \
		 sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium); }

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
