# The README's two commands. Each creates .venv and installs the project on first use.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: quickstart test bench

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

quickstart: $(VENV)/.installed
	$(PY) -m csm_train +experiment=tiny

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) bench/bench_step.py --preset tiny
	$(PY) bench/bench_step.py --preset 100m --batch 1 --frames 512 --steps 4
