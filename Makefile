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

# The Streamlit AppTest tests run in a second pytest process: AppTest runs page scripts in
# threads of the test process, and with the scientific C extensions loaded (galsim, torch,
# sklearn) that crashed the interpreter (a segfault in the garbage collector) in a long session.
test: setup
	$(BIN)/pytest
	$(BIN)/pytest -m apptest

test-all: setup
	$(BIN)/pytest -m "not remote_data and not apptest"
	$(BIN)/pytest -m apptest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy galsift db deploy ingest encoder detectors hitl

clean:
	-$(BIN)/galsift stack down
	rm -rf var
