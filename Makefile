# Two entry points (README): `make demo` runs the main job, `make test` runs the tests.
# Both create the virtual environment and install the project into it first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# 2 pytest-xdist workers (the CI machine's 2 cores), a file's tests on one worker, files in collection
# order (tests/conftest.py shares the session's builds between them); PYTEST_ARGS='-m "not slow"' runs
# them in one process
PYTEST_ARGS ?= -m "not slow" -n 2 --dist loadfile --no-loadscope-reorder --durations=30
# the emulated arm64 device tests set the device up themselves (qemu-user-static from apt when root,
# arm64 Debian packages + aarch64 TVM wheels, once per user and versions, in ~/.cache/mobilemoe/arm64-device/;
# $MOBILEMOE_CACHE moves it, $ARM64_ROOT names the dir itself); MOBILEMOE_ARM64=0 skips them
export MOBILEMOE_ARM64 ?= 1

.PHONY: venv demo test test-all clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -U pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,eval,mlir]'
	touch $(STAMP)

venv: $(STAMP)

PROMPT ?= The asyncio event loop
demo: venv
	$(PY) -m compiler.build --target android-arm64 --out dist/default-android-arm64
	readelf -h dist/default-android-arm64/lib.so | grep -E 'Machine|Type'
	$(PY) -m compiler.build --target host --out dist/default-host
	$(PY) -m compiler.run --artifact dist/default-host --prompt "$(PROMPT)" --max-new-tokens 48 \
		--reference mobilemoe/assets/default-model

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: venv
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) dist build *.egg-info
