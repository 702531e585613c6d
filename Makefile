# Quick start: `make demo` (set up + main job) and `make test` (set up + test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e ".[test,geo]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m xstars_models.demo --model xstars-s2-aerial --out demo_output

test: $(STAMP)
	$(PY) -m ruff check xstars_models
	$(PY) -m mypy
	$(PY) -m pytest

clean:
	rm -rf $(VENV) demo_output
