# Quick start: `make demo` trains on the bundled sample; `make test` runs the suite; `make test-fast` the inner loop.
# Each target sets itself up: the Debian packages it needs, .venv and requirements.txt.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FASHION_MNIST := /usr/share/datasets/fashion-mnist
# What the whole suite needs of the system: real images (Fashion-MNIST); sshd and rsync for `ray up` over SSH
# (tests/test_cluster_ssh.py); Chromium for the MLflow UI in a browser (tests/test_tracking.py).
TEST_PACKAGES := dataset-fashion-mnist openssh-server rsync chromium

.PHONY: demo test test-fast lint sysdeps test-sysdeps venv clean

sysdeps:
	@[ -d $(FASHION_MNIST) ] || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }

test-sysdeps:
	@missing=$$(for p in $(TEST_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing what the tests need: $$missing"; \
		{ $(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; } || \
		echo "warning: could not install $$missing: the SSH cluster test skips without openssh-server/rsync, the browser test without chromium, and every data test fails without dataset-fashion-mnist"; \
	fi

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

# The full suite: real Ray clusters, MLflow and S3 servers, sshd, a browser (about 65 minutes on 2 cores).
test: test-sysdeps venv
	$(PY) -m pytest

# The inner loop: everything that starts no Ray cluster (the `ray` marker) and takes no minutes (`slow`): under 5 minutes.
test-fast: sysdeps venv
	$(PY) -m pytest -m "not ray and not slow" -q

lint: venv
	$(VENV)/bin/ruff check rn50_ray tests bench launch.py
	$(VENV)/bin/ruff format --check rn50_ray tests bench launch.py

clean:
	rm -rf runs data/sample
