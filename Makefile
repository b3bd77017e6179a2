# make demo: fresh venv, install, run the main job.   make test: fresh venv, install, run the tests.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) examples/quickstart.py

test: $(VENV)/.installed
	$(PY) -m pytest tests -q

.PHONY: install demo test
