# Two commands for a fresh clone: `make train` and `make test` (see README).
SHELL := /bin/bash
# pipefail: a failing pip must fail the target even though its output is filtered.
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The exact pair that lies on this machine's disk (pip takes it from there, no download).
TORCH  := torch==2.14.1 torchvision==0.29.1
# Real CIFAR-10 (JPEG copy) when the shared folder is beside this checkout, else the
# official batches under ./data (downloaded by torchvision where the network allows).
SHARED_CIFAR := ../shared/datasets/cifar10-jpeg
TRAIN_ARGS ?= $(if $(wildcard $(SHARED_CIFAR)/train),--dataset imagefolder --data $(SHARED_CIFAR),)
ARGS ?=
PYTEST_ARGS ?=

.PHONY: venv train test clean

$(BIN)/cifarlab: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH) 2>&1 | { grep -v "is ignored: it is neither" || true; }
	$(BIN)/python -c "import torch, torchvision" # fail here, not later, if the pair is missing
	$(BIN)/python -m pip install -q -e '.[dev,demo,export,tensorboard]' 2>&1 | { grep -v "is ignored: it is neither" || true; }
	test -x $@ && touch $@

venv: $(BIN)/cifarlab

train: venv
	$(BIN)/cifarlab train $(TRAIN_ARGS) $(ARGS)

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
