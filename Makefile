# promptopt — two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv (if missing) and installs the package with its dev extras first.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.promptopt-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install demo test bench clean postgres

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/promptopt demo --out runs/demo

test: $(STAMP) postgres
	$(BIN)/python -m pytest -q

# The search tests start a throw-away PostgreSQL server in a temporary folder (tests/conftest.py) from the
# distribution's binaries: install them when missing and this user can (root with apt-get). Otherwise those
# tests are skipped with the reason, unless PROMPTOPT_REQUIRE_POSTGRES=1 (CI), which makes them fail.
postgres:
	@if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing PostgreSQL for the tests (apt-get install postgresql)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	else echo "note: PostgreSQL is not installed and cannot be installed here: its tests will be skipped"; fi

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_oracle.py

clean:
	rm -rf runs .pytest_cache
