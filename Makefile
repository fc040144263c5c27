# Two entry points on a fresh machine with Python >= 3.10 and make:
#   make train   set up .venv, download CIFAR-10 on first use, train with the tutorial's recipe
#   make test    set up .venv and run the test suite
#   make pretrained  retrain the bundled weights (src/cifarctl/pretrained/) from a local CIFAR-10 copy
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
# The JPEG copy of CIFAR-10 the bundled weights are trained on (its sha256 goes into their metadata).
PRETRAINED_SOURCE ?= ../shared/datasets/cifar10-jpeg.tar.gz

.PHONY: setup train test bench clean pretrained

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/.installed

train: setup
	$(BIN)/cifarctl train $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

pretrained: setup
	$(BIN)/python benchmarks/make_pretrained.py --source $(PRETRAINED_SOURCE) $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
