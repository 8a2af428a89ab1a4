# The README's two commands: `make demo` (the main job) and `make test` (the test suite).
# Both first set up .venv (tools/setup_env.sh), which is quick when it is already up to date.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo demo-quick demo-allocation test test-slurm gpu-check

setup:
	VENV=$(VENV) bash tools/setup_env.sh

demo: setup
	$(PY) tools/run_demo.py $(ARGS)

# lint and format check (ruff), then the test suite on every core (pytest-xdist; a module's tests
# share one worker, so its module fixtures are built once)
test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest tests -n auto --dist loadfile --durations=10 $(ARGS)

# The study on a real single-node SLURM started on this machine (Debian's slurm-wlm, slurmdbd with
# MariaDB, munge; installed if missing, as root): tools/slurm/local_slurm.sh, then tests/test_study_slurm.py.
test-slurm: setup
	bash tools/slurm/local_slurm.sh start
	SLURM_CONF=$${SLURM_LOCAL_DIR:-/tmp/scalenet_d2_slurm}/slurm.conf $(PY) -m pytest tests/test_study_slurm.py -v $(ARGS)

# A 20-second smoke run of the main job (a few iterations on a tiny split).
demo-quick: setup
	$(PY) tools/run_demo.py --quick $(ARGS)

# Detection-aware neuron allocation on the synthetic set: seed detector, allocation, three arms (docs/neuron_allocation.md)
demo-allocation: setup
	$(PY) tools/run_allocation_demo.py $(ARGS)

# On a machine with a CUDA GPU: the CUDA tests and the S50/R50 speed and memory tables (tools/gpu_check.sh).
gpu-check: setup
	PY=$(PY) bash tools/gpu_check.sh
