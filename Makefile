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

# The type check runs beside the tests (it is single-threaded and takes ~15 s cold) and both must
# pass; its report is in $(VENV)/mypy.log, printed after the tests' summary only when it fails.
test: $(STAMP)
	$(PY) -m ruff check xstars_models
	$(PY) -m mypy > $(VENV)/mypy.log 2>&1 & mypy=$$!; \
	$(PY) -m pytest; tests=$$?; \
	if ! wait $$mypy; then cat $(VENV)/mypy.log; exit 1; fi; \
	exit $$tests

clean:
	rm -rf $(VENV) demo_output
