# The two entry points: `make demo` and `make test`. Each creates .venv and installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: setup demo test lint

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/kestrel generate --temperature 0 --repetition-penalty 1.15 --max-tokens 64 "def fibonacci(n):"

test: setup
	$(PY) -m pytest -p no:cacheprovider

lint: setup
	$(VENV)/bin/ruff check kestrel tests
