# Two commands on a fresh machine:  make demo   and   make test
# Both create .venv at the repository root on first use and install the pinned requirements.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP_VERSION := 26.3

.PHONY: install demo test test-unit test-distributed bench clean

$(STAMP): setup.py
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required; set PYTHON=python3.11")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "pip==$(PIP_VERSION)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/s2lpo_demo.py

test: $(STAMP)
	$(PY) -m pytest

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit

test-distributed: $(STAMP)
	$(PY) -m pytest tests/distributed

bench: $(STAMP)
	$(PY) benchmarks/algo_bench.py

clean:
	rm -rf $(VENV) build *.egg-info
