# Two commands on a fresh machine:  make demo   and   make test   (make bridge: the distillation bridge demo)
# Both create .venv at the repository root on first use and install the pinned requirements.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP_VERSION := 26.3
# Test files run in parallel worker processes (one file stays on one worker, so module fixtures
# are built once); 2 matches the CI machine's cores.
TEST_WORKERS ?= 2

.PHONY: install sglang-env demo bridge test test-unit test-distributed test-faults test-slurm bench clean

$(STAMP): setup.py
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required; set PYTHON=python3.11")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "pip==$(PIP_VERSION)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	$(PY) tests/contract/sglang_env.py  # SGLang 0.5.23's wheel, unpacked for the contract tier
	$(PY) tests/contract/verl_env.py  # verl's wheel, unpacked: its DAPO reward manager is the overlong reference
	touch $(STAMP)

# The real SGLang 0.5.23 servers of the test suite run from their own pinned environment,
# .venv-sglang (tools/sglang_env.py, standard library only: CPU torch 2.13.0, SGLang's
# requirements, two source fixes); a second run only checks its stamp. It does not need .venv,
# so `install` builds both at once (most of either build is waiting for downloads).
sglang-env:
	$(PYTHON) tools/sglang_env.py

install:
	$(MAKE) --no-print-directory -j2 $(STAMP) sglang-env

demo: $(STAMP)
	$(PY) examples/s2lpo_demo.py

# A fresh output directory per run (a staged run refuses a directory that already holds one).
bridge: $(STAMP)
	$(PY) -m megatron_s2lpo.cli train examples/tiny_bridge_cpu.yaml run.output_dir=runs/tiny_bridge_cpu/$$(date +%Y%m%d-%H%M%S)

test: install
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --ignore=tests/slurm
	$(MAKE) --no-print-directory test-slurm

# The Slurm tier: a real Slurm 22.05 with three emulated nodes (tests/slurm/emulated_slurm.py
# installs and starts it); it needs root and apt, as CI has, and skips with the reason otherwise.
# -s: it prints its figures (stop signal -> job end, chained resume, setup time).
test-slurm: install
	$(PY) -m pytest tests/slurm -s

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit

test-distributed: $(STAMP)
	$(PY) -m pytest tests/distributed

# Fault injection (docs/training.md, "Resume"); the soak takes S2LPO_SOAK_KILLS / S2LPO_SOAK_SEED.
test-faults: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile tests/faults

bench: $(STAMP)
	$(PY) benchmarks/algo_bench.py

clean:
	rm -rf $(VENV) .venv-sglang build *.egg-info
