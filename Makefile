# Quick start: `make demo` trains on the bundled sample; `make test` runs the suite.
# Each target sets itself up: the Debian data package, .venv and requirements.txt.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: demo test lint sysdeps venv clean

sysdeps:
	@[ -d $(FASHION_MNIST) ] || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

venv: $(VENV)/.installed

data/sample: | sysdeps venv
	$(PY) launch.py prepare-sample --out data/sample --train-per-class 100 --val-per-class 20 --size 32

demo: sysdeps venv data/sample
	$(PY) launch.py train --recipe cpu_demo

test: sysdeps venv
	$(PY) -m pytest

lint: venv
	$(VENV)/bin/ruff check rn50_ray tests bench launch.py
	$(VENV)/bin/ruff format --check rn50_ray tests bench launch.py

clean:
	rm -rf runs data/sample
