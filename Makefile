# The README's two commands: `make run` (the whole DAG locally) and `make test`.
# Each installs what it needs from uv.lock first, so both work on a fresh machine.
SHELL := /bin/bash
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1
export GX_ANALYTICS_ENABLED := false
UV := $(shell command -v uv 2>/dev/null || echo python3 -m uv)

.PHONY: setup run test lint data repro bench-ingest podman images test-containers

# No --compile-bytecode: compiling all 18k files of the environment costs ~1 min on 2 cores; an import
# compiles what it uses.
setup:
	@$(UV) --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	$(UV) sync --frozen

run: setup
	$(UV) run python -m pipelines.run_local

test: setup
	$(UV) run ruff check .
	$(UV) run ruff format --check .
	$(UV) run pytest -q

lint: setup
	$(UV) run ruff check . && $(UV) run ruff format --check .

# A corpus restored by `dvc pull` (or your own IEMOCAP copy) carries no synth marker: it is kept as it is.
data: setup
	@if [ -d data/IEMOCAP_full_release ] && [ ! -f data/IEMOCAP_full_release/.sermtl-output.json ]; then \
	  echo "data/IEMOCAP_full_release exists and was not generated here (dvc pull or IEMOCAP): kept"; \
	else $(UV) run sermtl synth --out data/IEMOCAP_full_release; fi

repro: data
	$(UV) run dvc repro

bench-ingest: setup
	$(UV) run python bench/ingest/run.py

# Containers: podman from Debian's archive with the project's containers.conf, then the three images
# (infra/containers/build-images.sh: BASE=auto|official|debian, IMAGES=...). `setup` fills uv's cache, which
# a build without registry access installs from.
podman:
	infra/containers/setup.sh

images: setup podman
	infra/containers/build-images.sh

# The CPU image runs ingest, validate and a training run with the host's results, and the MLflow image serves
# on the local stack with basic auth (tests/test_containers.py).
test-containers: images
	SERMTL_TEST_CONTAINERS=1 $(UV) run pytest -q tests/test_containers.py
