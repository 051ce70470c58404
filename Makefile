# medseg-monai: every target here works; `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 5000
PYTEST_ARGS ?=
TEST_WORKERS ?= auto
PROFILE ?= quick
STUDIES ?=
SEEDS ?=
FORCE ?=
JOBS ?=
PROFILE_TIME ?=
LAUNCHER ?= local
FAST ?=
PARTITION ?=
GPUS_PER_JOB ?=
CPUS_PER_JOB ?=
TIME ?=
MEM_GB ?=
GPU_PROOF_JSON ?= runs/gpu_proof.json

.PHONY: help install test test-slow test-all lint format data reproduce-all report bench gpu-proof mlflow-ui clean

help:
	@echo "make install    create $(VENV) (torch==2.13.0 first when none is importable), pip install -e .[dev]"
	@echo "make test       the default test run, minutes: every fast test and one end-to-end path per bundle"
	@echo "make test-slow  the slow remainder (every experiment trained, the grids, the searches)"
	@echo "make test-all   both (what CI runs); real-sample tests read ../shared/data, or skip saying why"
	@echo "make lint       ruff check and format check"
	@echo "make data       generate every synthetic dataset into the cache (\$$MEDSEG_CACHE)"
	@echo "make reproduce-all [PROFILE=quick|paper] [STUDIES=\"wmh xray\"] [SEEDS=\"0 1\"] [FORCE=1] [JOBS=n] [PROFILE_TIME=1]"
	@echo "                 [FAST=1] [LAUNCHER=local|slurm|submitit-local] [PARTITION=p GPUS_PER_JOB=n CPUS_PER_JOB=n TIME=min MEM_GB=n]"
	@echo "                 every bundle's experiment grid (train + evaluate), resumable; then the report"
	@echo "make report     rebuild mlflow/reports/report.md and report.html from the MLflow store"
	@echo "make bench      training/inference throughput vs a plain PyTorch loop -> bench.json"
	@echo "make gpu-proof  [GPU_PROOF_JSON=f] the GPU path of every bundle against issue #42's targets, ~8 min (docs/gpu-proof.md)"
	@echo "make mlflow-ui  serve the tracking store on http://$(HOST):$(PORT)"

$(PY):
	$(PYTHON) -m venv $(VENV)

# every target that runs the project installs it first when it is not (a fresh clone: `make test`)
INSTALLED := $(VENV)/.installed

install: $(PY)
	@# A bare or newer torch requirement would pull GBs of CUDA wheels: pin the local CPU build first.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	@$(PY) -c "import torch, monai, mlflow; print(f'installed: torch {torch.__version__}, monai {monai.__version__}, mlflow {mlflow.__version__}')"
	@touch $(INSTALLED)

$(INSTALLED): pyproject.toml | $(PY)
	@echo "$(VENV) has no installed project yet (or pyproject.toml changed): running make install first"
	$(MAKE) install

# one pytest-xdist worker per core (TEST_WORKERS=1 runs them in this process)
XDIST = $(if $(filter 1,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist worksteal)

test: $(INSTALLED)
	$(PY) -m pytest -m "not slow" $(XDIST) $(PYTEST_ARGS)

test-slow: $(INSTALLED)
	$(PY) -m pytest -m slow $(XDIST) $(PYTEST_ARGS)

test-all: $(INSTALLED)
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(INSTALLED)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

data: $(INSTALLED)
	$(PY) -m medseg_monai.data generate

reproduce-all: $(INSTALLED)
	$(PY) -m medseg_monai.reproduce --profile $(PROFILE) $(if $(STUDIES),--studies $(STUDIES)) \
		$(if $(SEEDS),--seeds $(SEEDS)) $(if $(FORCE),--force) $(if $(JOBS),--jobs $(JOBS)) \
		$(if $(PROFILE_TIME),--profile-time) --launcher $(LAUNCHER) $(if $(PARTITION),--partition $(PARTITION)) \
		$(if $(GPUS_PER_JOB),--gpus-per-job $(GPUS_PER_JOB)) $(if $(CPUS_PER_JOB),--cpus-per-job $(CPUS_PER_JOB)) \
		$(if $(TIME),--time $(TIME)) $(if $(MEM_GB),--mem-gb $(MEM_GB)) $(if $(FAST),--fast)

report: $(INSTALLED)
	$(PY) -m medseg_monai.report

bench: $(INSTALLED)
	$(PY) -m medseg_monai.bench --output bench.json

# a CUDA machine only (a CPU one is refused in one line); on a lent device see docs/gpu-proof.md
gpu-proof: $(INSTALLED)
	$(PY) -m medseg_monai.gpu_proof --output $(GPU_PROOF_JSON)

mlflow-ui: $(INSTALLED)
	@mkdir -p mlflow/artifacts
	@# each experiment's runs table (MLflow 3 opens an experiment on its GenAI page otherwise)
	@$(PY) -m medseg_monai.tracking links http://$(HOST):$(PORT)
	@# no background job runners: the UI only browses the store
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(VENV)/bin/mlflow ui --host $(HOST) --port $(PORT) \
		--backend-store-uri "$$($(PY) -c 'from medseg_monai.tracking import tracking_uri; print(tracking_uri())')" \
		--default-artifact-root "$(CURDIR)/mlflow/artifacts"

clean:
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info
