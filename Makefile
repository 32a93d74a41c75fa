# The two set-up commands of the README: `make demo` and `make test`.
# Both create .venv when it is missing and install labtwin into it.
#   make test       lint, types and the whole suite (what CI runs); fails if any of the three fails
#   make test-fast  the inner loop: the suite without the slow tests (tests/integration/, @pytest.mark.slow), < 2 min
#   make lint       ruff check, ruff format --check, the layer contracts (lint-imports)
#   make typecheck  mypy on labtwin (pydantic plugin; config in pyproject.toml)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: demo test test-fast suite lint typecheck install bench clean

# pytest exits 5 when it collected nothing: a suite that ran no test has not passed.
# Three workers on two cores: the tests mostly wait (README "Tests"). A worker that crashes (a fatal signal in a
# native library) fails the run: xdist's replacement worker once left the controller waiting forever.
PYTEST = $(BIN)/python -m pytest -q -p no:cacheprovider -n 3 --dist loadfile --max-worker-restart=0
define run_pytest
	$(PYTEST) $(1); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc
endef

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m labtwin.orchestration.prefect_template  # Prefect's migrated database, once (ADR 0019)
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/labtwin demo

# All three run even when one fails, so one CI run reports on each; the exit status is a failure if any failed.
test: install
	@failed=""; \
	$(MAKE) --no-print-directory lint || failed="$$failed lint"; \
	$(MAKE) --no-print-directory typecheck || failed="$$failed typecheck"; \
	$(MAKE) --no-print-directory suite || failed="$$failed suite"; \
	if [ -n "$$failed" ]; then echo "make test failed:$$failed"; exit 1; fi; echo "make test: lint, typecheck and suite passed"

suite: install
	$(call run_pytest,tests)

test-fast: install
	$(call run_pytest,-m "not slow" tests)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: install
	$(BIN)/mypy

bench: install
	$(BIN)/python bench/bus_throughput.py

clean:
	rm -rf $(VENV) labtwin-data
