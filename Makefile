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

# Until the bundled xstars-s2-aerial model ships, the set-up step saves an untrained model.
DEMO_MODEL := demo_output/untrained-model
$(DEMO_MODEL)/config.json: $(STAMP)
	$(PY) -c "from xstars_models import XStars; XStars.new('vit_tiny_patch16_224', ['sentinel2_rgb'], patch_size=8, img_size=64).save_pretrained('$(DEMO_MODEL)')"

demo: $(DEMO_MODEL)/config.json
	$(PY) -m xstars_models.demo --model $(DEMO_MODEL) --out demo_output

test: $(STAMP)
	$(PY) -m pytest

clean:
	rm -rf $(VENV) demo_output
