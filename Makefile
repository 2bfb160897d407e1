# Two commands on a fresh machine: `make run` (app on the embedded digits default)
# and `make test` (install + tests).  Both create .venv and install the project.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast lint bench bench-foundation lds retrain-top

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev,diffusers]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/streamlit run explorer/app.py --server.headless true -- --preset digits

# pytest-xdist workers: the suite is mostly one-thread work (tests/conftest.py pins torch to 1 thread), so two workers
# use both cores of a CI machine (sequential pytest took 14-15 min of .ci/run's 16-18 under load; with two
# workers 9-11 min, .ci/run 12.9 min at 7098104 with a browser QA beside it)
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/ruff check engine explorer tests scripts
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=15 tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not slow and not browser" tests

lint: $(STAMP)
	$(BIN)/ruff check engine explorer tests

bench-foundation: $(STAMP)
	$(BIN)/python -m engine bench-foundation

bench: $(STAMP)
	$(BIN)/python -m engine bench

# The evaluations on the digits default (hours on 2 CPU cores; resumable: rerun to continue).
lds: $(STAMP)
	$(BIN)/python -m engine lds --preset digits --subsets 32 --seeds 2 --fraction 0.5 --queries 128 \
		--measurement loss --methods kfac,trak,dtrak,clip,pixel --workers 2

retrain-top: $(STAMP)
	$(BIN)/python -m engine retrain-top --preset digits --query gallery:0,gallery:1,gallery:2 --fraction 0.02 \
		--methods kfac,trak,dtrak,pixel --measurement loss --workers 2
