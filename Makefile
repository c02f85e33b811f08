# galsift: the two commands of the README, and a few helpers.
#   make demo   - set everything up, start Kafka + PostgreSQL, the services and a demo feed of real images
#   make test   - set everything up and run the test suite (what .ci/run calls)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup demo test test-all lint clean

$(BIN)/galsift: pyproject.toml
	bash deploy/bootstrap.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
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

clean:
	-$(BIN)/galsift stack down
	rm -rf var
