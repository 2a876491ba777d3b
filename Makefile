# Two commands on a fresh machine: `make run` and `make test`. Both install into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: install run lint test test-fast reliability models eval clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# torch first, pinned: it takes the local CPU build; a range would pull GBs of CUDA wheels
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[all,test]"  # the services, the trainer and the tests; `pip install .` alone is the light client
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/assay run

# What CI checks before the tests: ruff's lint and formatter (settings in pyproject.toml), then mypy (strict on
# the clients, search and the wire types; tools/typecheck.py lays out the package as package-dir maps it).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) tools/typecheck.py

# Two workers, whole test files each (tests in one file share their servers): much of the suite
# waits on servers starting in subprocesses, so two workers on two cores take about 2/3 the time.
# The files run longest first (tests/order.py; --no-loadscope-reorder keeps that order), so the two
# workers finish together. One torch thread per process (OMP_NUM_THREADS, inherited by every server
# a test starts): two workers on two cores with torch's default of a thread per core spin against
# each other, and tiny models gain nothing from a second thread anyway.
# pytest exits 5 when it collects no test: that means the suite went missing, so say so and fail.
TEST_WORKERS ?= 2
test: install
	@OMP_NUM_THREADS=1 $(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

# The quick loop: the unit tier (pure, in-process tests; tests/tiers.py), without what is marked slow.
test-fast: install
	$(PY) -m pytest -m "unit and not slow" $(PYTEST_ARGS)

reliability: install
	$(PY) -m pytest -m reliability tests/reliability $(PYTEST_ARGS)

models: install
	$(VENV)/bin/assay models build

eval: install
	$(VENV)/bin/assay eval

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build/typecheck
