# `make repro` runs the pipeline, `make test` the tests; both set up .venv first (once per pyproject change).
VENV := .venv
BIN := $(VENV)/bin

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

.PHONY: setup repro test test-all ui
setup: $(VENV)/.installed

repro: setup
	PATH=$(CURDIR)/$(BIN):$$PATH dvc repro

test: setup
	PATH=$(CURDIR)/$(BIN):$$PATH python -m pytest

test-all: setup
	PATH=$(CURDIR)/$(BIN):$$PATH python -m pytest -m ''

ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --host 127.0.0.1 --port 5000
