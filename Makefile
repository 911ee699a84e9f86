# Concept Factory: every set-up step a fresh machine needs is in these targets.
#   make demo   create .venv if missing, then run the main job on the embedded toyworld default
#   make test   create .venv if missing, then run the default test suite (what CI runs)
#   make test-slow   the slower checks (minutes each), skipped by `make test`
#   make tables      the paper's Tables 1-2 end to end in toyworld (about 40 min on 2 cores; resumable)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: venv demo test test-slow tables lint clean

venv: $(VENV)/.installed

# torch is pinned to the CPU-usable pair that lies on these machines' disk (torch 2.13.0's CPU wheel does
# not load beside PyPI's torchvision); the constraints file pins every other package for dev and CI.
$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements/constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -c requirements/constraints.txt -e '.[test,students]'
	touch $@

demo: venv
	$(VENV)/bin/factory generate configs/toyworld.yaml

test: venv
	$(VENV)/bin/ruff check factory trainers tests examples
	$(PY) -m pytest -q

test-slow: venv
	$(PY) -m pytest -q -m slow

tables: venv
	$(VENV)/bin/trainers toyworld-tables --out out/tables

lint: venv
	$(VENV)/bin/ruff check factory trainers tests

clean:
	rm -rf out runs .pytest_cache
