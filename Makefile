# The README commands. Each creates the virtual environment in $(VENV) if it is missing.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test experiments lab env clean-env

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
# copies (and their HTML), CSVs and PNGs land in results/. No GPU: the quick profile on the first dataset to be
# had (Imagenette-160, else Fashion-MNIST from Debian's dataset-fashion-mnist, else the sample digits).
experiments: $(STAMP)
	$(PY) -m bnet_fastai.app.notebooks

# Registers the environment's kernel "bnet-fastai" inside the environment (ipykernel's --sys-prefix: seen by
# this JupyterLab, no root needed, nothing written to ~), then starts JupyterLab on notebooks/ at 127.0.0.1.
# Extra or overriding jupyter lab options: make lab LAB_ARGS="--ip=0.0.0.0 --port=8890 --no-browser"
LAB_ARGS ?=
lab: $(STAMP)
	$(PY) -m bnet_fastai.app.lab $(LAB_ARGS)

clean-env:
	rm -rf $(VENV)
