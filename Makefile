# Concept Factory: every set-up step a fresh machine needs is in these targets. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0

.DEFAULT_GOAL := help
.PHONY: help venv demo test test-fast test-slow tables format lint clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

venv: $(VENV)/.installed ## create .venv with the pinned packages (editable factory + trainers)

# torch is pinned to the CPU-usable pair that lies on these machines' disk (torch 2.13.0's CPU wheel does
# not load beside PyPI's torchvision); the constraints file pins every other package for dev and CI.
$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements/constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip uninstall -y -q opencv-python-headless  # older venvs: both would install cv2/
	$(PY) -m pip install -q -c requirements/constraints.txt -e '.[test,students]'
	touch $@

demo: venv ## the main job on the embedded toyworld default (local Ray, CPU, ~5 min)
	$(VENV)/bin/factory generate configs/toyworld.yaml

test: venv lint ## lint, then the default test suite: what CI runs (~16-18 min on 2 cores)
	$(PY) -m pytest -q

test-fast: venv ## the fast lane: no training (Ray Train, DeepSpeed, Tune), no whole jobs (~2 min)
	$(PY) -m pytest -q -m 'not slow and not training and not integration'

test-slow: venv ## the slower checks that `make test` skips (~17 min)
	$(PY) -m pytest -q -m slow

tables: venv ## the paper's Tables 1-2 in toyworld, 3 student seeds (resumable; docs/results.md)
	$(VENV)/bin/trainers toyworld-tables --out out/tables --docs docs/results/toyworld-tables.md

format: venv ## ruff format and the import-order fix
	$(VENV)/bin/ruff format factory trainers tests examples
	$(VENV)/bin/ruff check --select I --fix factory trainers tests examples

lint: venv ## ruff check and ruff format --check
	$(VENV)/bin/ruff check factory trainers tests examples
	$(VENV)/bin/ruff format --check factory trainers tests examples

clean: ## remove outputs and caches (out/, runs/, .pytest_cache)
	rm -rf out runs .pytest_cache
