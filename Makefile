# galsift: the two commands of the README, and a few helpers.
#   make demo   - set everything up, start Kafka + PostgreSQL, the services and a demo feed of real images
#   make test   - set everything up and run the test suite (what .ci/run calls)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test test-all lint lock clean

PIP_VERSION := 26.3

# requirements.lock pins every package (a constraints file: pyproject.toml says what is needed,
# the lock which versions), so two set-ups install the same environment
$(BIN)/galsift: pyproject.toml requirements.lock
	bash deploy/bootstrap.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "pip==$(PIP_VERSION)"
	$(BIN)/pip install --quiet -e ".[dev]" -c requirements.lock
	touch $@

setup: $(BIN)/galsift

demo: setup
	$(BIN)/galsift up --demo

# `make test` includes the Streamlit AppTest page tests (marker apptest; `pytest -m apptest`
# runs only them).
test: setup
	$(BIN)/pytest

test-all: setup
	$(BIN)/pytest -m "not remote_data"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy galsift db deploy ingest encoder detectors hitl

# after changing a dependency in pyproject.toml: install it, check the suite, then pin what ran
lock: setup
	{ echo "# pinned versions of every Python package galsift installs (make lock regenerates it from a"; \
	  echo "# working environment); make setup installs with it as a constraints file, so set-up is deterministic"; \
	  $(BIN)/pip freeze --exclude-editable; } > requirements.lock

clean:
	-$(BIN)/galsift stack down
	rm -rf var
