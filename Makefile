# The two README commands. Each creates the virtual environment in $(VENV) if it is missing.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test experiments env clean-env

env: $(STAMP)

# Reinstall when the dependency list changes. pip resolves torch + torchvision together (see README).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# Executes notebooks/experiments.ipynb and notebooks/batchnorm_basics.ipynb headless (papermill); the executed
# copies, CSVs and PNGs land in results/. No GPU and no network: the sample digits and the quick profile.
experiments: $(STAMP)
	$(PY) -m bnet_fastai.notebooks

clean-env:
	rm -rf $(VENV)
