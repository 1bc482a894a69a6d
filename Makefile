# Two entry points (README): `make demo` runs the main job, `make test` runs the tests.
# Both create the virtual environment and install the project into it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?= -m "not slow"

.PHONY: venv demo test test-all clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -U pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(PY) -m mobilemoe.generate --prompt "The Python interpreter" --max-new-tokens 48

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: venv
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) dist build *.egg-info
