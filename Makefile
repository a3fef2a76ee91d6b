# The two commands a new user needs: `make quickstart` and `make test`.
# Each creates .venv when missing and installs jaxft (editable) with the extras it needs.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: quickstart test venv install install-test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

venv: $(BIN)/python
install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

quickstart: install
	$(BIN)/jaxft quickstart

test: install-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install-test
	$(BIN)/python -m pip install --quiet ruff && $(BIN)/ruff check jaxft tests scripts

clean:
	rm -rf $(VENV) .pytest_cache runs/quickstart
