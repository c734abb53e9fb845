# recapflow: `make run` materializes the lineage, `make test` runs the suite.
# Both create .venv (project) and .venv-dvc (DVC, kept apart: its antlr4 pin breaks
# Dagster's asset selection) when missing. All state stays inside this folder.

SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
DVC_VENV := .venv-dvc
PY := $(VENV)/bin/python
DVC := $(DVC_VENV)/bin/dvc
ROOT := $(CURDIR)

export PIP_CONSTRAINT := $(ROOT)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export DAGSTER_HOME := $(ROOT)/.dagster_home
export MLFLOW_TRACKING_URI ?= sqlite:///$(ROOT)/mlflow.db
export DVC_SITE_CACHE_DIR := $(ROOT)/.dvc/tmp/site_cache
export DVC_NO_ANALYTICS := 1
export HF_HOME := $(ROOT)/.hf_cache
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION := false

# pip's output minus the warnings about absent local index folders on these machines
# (grep's own status is masked so that pipefail reports pip's).
PIP_QUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: install run test generate ui mlflow bench retrain ablation lint format dvc-repro dvc-exp dvc-push dvc-pull clean

install: $(VENV)/.installed $(DVC_VENV)/.installed $(DAGSTER_HOME)/dagster.yaml

$(VENV)/.installed: pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	set -o pipefail; $(PY) -m pip install -q --upgrade pip $(PIP_QUIET)
	set -o pipefail; $(PY) -m pip install -q -e '.[dev]' $(PIP_QUIET)
	$(PY) -c "import torch, torchvision, dagster, mlflow, lightning, diffusers, transformers, open_clip"
	@touch $@

$(DVC_VENV)/.installed: constraints.txt
	@test -x $(DVC_VENV)/bin/python || $(PYTHON) -m venv $(DVC_VENV)
	set -o pipefail; PIP_CONSTRAINT= $(DVC_VENV)/bin/pip install -q 'dvc[s3]==3.67.1' $(PIP_QUIET)
	$(DVC) --version >/dev/null
	$(DVC_VENV)/bin/python -c "import dvc_s3"
	@touch $@

# Pools cap concurrent steps per pool: one training at a time in `gpu`, one writer of
# data/raw in `corpus_write` (landed shards arrive together), one recaptioning in
# `recaption` (`dagster instance concurrency set recaption N` on a bigger machine).
$(DAGSTER_HOME)/dagster.yaml: Makefile
	@mkdir -p $(DAGSTER_HOME)
	@printf 'telemetry:\n  enabled: false\nconcurrency:\n  pools:\n    default_limit: 1\n' > $@

DAGSTER := $(VENV)/bin/dagster asset materialize -m pipelines.definitions
# Steps of the last run one at a time: each trains with every core, so side by side on a
# small CPU they slow each other down many times over (docs/log/).
RUN_CONCURRENCY ?= 1
# Steps whose code, parameters and inputs are unchanged since dvc.lock are reused
# (assets/reuse.py); REBUILD=all, or a comma list of assets, builds them anyway.
REBUILD ?=
RUN_STARTED := $(shell date +%s)
LAST_STEPS := mixed_sampler,autoencoder,text_encoder,diffusion_model,world_judge,reference_clip,prompt_expander,feedback_pool,preference_model,rich_feedback_model,eval_report

# A command runs only when one of its assets needs it (pipelines/stale.py: changed since
# dvc.lock, never materialized, or asked for by REBUILD); a failed check stops the run.
NEEDED = need=$$($(PY) -m pipelines.stale $(1)) || exit 1; [ "$$need" = current ] ||

run: export RECAPFLOW_REBUILD = $(REBUILD)
run: install
	$(PY) -m pipelines.slots  # pool slots left claimed by a killed earlier run
	$(call NEEDED,raw_alt_text_dataset) $(DAGSTER) --select raw_alt_text_dataset --partition-range "$$($(PY) -m pipelines.where --register-partitions)"
	$(call NEEDED,captioner) $(DAGSTER) --select captioner
	$(call NEEDED,recaptioned_dataset) $(DAGSTER) --select recaptioned_dataset --partition-range "$$($(PY) -m pipelines.where --partition-range)"
	$(call NEEDED,$(LAST_STEPS)) $(DAGSTER) --select '$(LAST_STEPS)' \
		--config-json '{"execution": {"config": {"multiprocess": {"max_concurrent": $(RUN_CONCURRENCY)}}}}'
	@$(PY) -m pipelines.where --since $(RUN_STARTED)

test: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q $(PYTEST_ARGS)

# Draw prompts with the registered champion: make generate PROMPT="a red star" [EXPAND=4]
# (expanded by the prompt expander, unfaithful expansions replaced by the prompt itself).
PROMPT ?= a red star in the center
EXPAND ?= 0
generate: install
	$(PY) -m models.serving.generate "$(PROMPT)" --expand $(EXPAND) --expander data/prompt_expander --out generated

ui: install
	$(VENV)/bin/dagster dev -m pipelines.definitions -h 127.0.0.1 -p 3000

mlflow: install
	$(VENV)/bin/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) -h 127.0.0.1 -p 5000

bench: install
	$(PY) -m benchmarks.raw_dataset_throughput
	$(PY) -m benchmarks.captioning_throughput
	$(PY) -m benchmarks.recaption_throughput
	$(PY) -m benchmarks.diffusion_throughput

# The retrain job by hand (what retrain_schedule and retrain_on_new_data launch): every raw
# shard in one run, recaptioning only new or stale shards, then blend, train, eval, gate.
retrain: install
	$(VENV)/bin/dagster job execute -m pipelines.definitions -j retrain --tags "$$($(PY) -m pipelines.where --retrain-tags)"

# The caption ablation (pipelines/ablation.py, docs/ablation.md) on the materialized
# lineage of `make run`: 15 runs of the default length. Finished runs are recorded in
# metrics/ablation/runs/ and reused, so a stopped study resumes. ABLATION_CONFIG: a run
# config for another study (e.g. configs/sweep-blend.yaml).
ABLATION_CONFIG ?=
ablation: install
	$(PY) -m pipelines.slots
	$(VENV)/bin/dagster job execute -m pipelines.definitions -j caption_ablation \
		$(if $(ABLATION_CONFIG),-c $(ABLATION_CONFIG))

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

dvc-repro: install
	$(DVC) repro

# docs/dvc.md. An experiment: make dvc-exp EXP_SET='mixed_sampler.synthetic_ratio=0.8'.
# Remotes (.dvc/config): localstore (dvc-remote/, the default), objectstore (compose S3):
# make dvc-push DVC_REMOTE=objectstore (keys from the environment or .dvc/config.local).
dvc-exp: install
	$(DVC) exp run $(addprefix -S ,$(EXP_SET))
	$(DVC) exp show --no-pager

dvc-push: install
	$(DVC) push $(if $(DVC_REMOTE),-r $(DVC_REMOTE))

dvc-pull: install
	$(DVC) pull $(if $(DVC_REMOTE),-r $(DVC_REMOTE))

clean:
	rm -rf data .dagster_home mlflow.db mlartifacts .dvc/cache .dvc/tmp
