# Everything runs inside a local virtualenv that the first target to need it creates.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test table clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	touch $@

test: setup
	$(PY) -m pytest -q

table: setup
	$(PY) bench/model_table.py

clean:
	rm -rf $(VENV) .pytest_cache
