# momkit: two commands set everything up on a fresh machine.
#   make demo   create .venv, install, run the main job (the demo sweep, sweeps/demo.yaml)
#   make test   create .venv, install, run ruff and the test suite
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch on this kind of machine; override for a CUDA build, e.g. TORCH=torch
TORCH ?= torch==2.13.0
EXTRAS ?= all
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?= -n 2
# worker processes of the demo sweep (it is sized for 2 CPU cores)
DEMO_WORKERS ?= 2

.PHONY: demo rules-demo test venv clean bench-cpu lab

$(VENV)/.installed-$(EXTRAS): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[$(EXTRAS)]"
	touch $@

venv: $(VENV)/.installed-$(EXTRAS)

# The demo sweep on the default SQLite storage (runs/sweeps.db; run again, it resumes), then its results table
# and figures (runs/sweeps/demo/report/). See docs/sweeps.md.
demo: venv
	$(PY) -m momkit sweep sweeps/demo.yaml --workers $(DEMO_WORKERS)
	$(PY) -m momkit sweep-report demo

# Every update rule's chunk-parallel path against its token-loop reference: agreement and speed.
rules-demo: venv
	$(PY) -m momkit.demo

test: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# Jupyter refuses to start as root without --allow-root; containers and cloud notebooks run as root.
USER_ID ?= $(shell id -u)
LAB_ARGS ?= $(if $(filter 0,$(USER_ID)),--allow-root)
lab: venv
	$(VENV)/bin/python -m ipykernel install --sys-prefix --name momkit --display-name "momkit (.venv)" >/dev/null
	$(VENV)/bin/jupyter lab notebooks $(LAB_ARGS)

bench-cpu: venv
	$(PY) -m benchmarks.cpu_rules --out benchmarks/results/cpu_rules_default.json
	$(PY) -m benchmarks.cpu_rules --allocator tuned --out benchmarks/results/cpu_rules_tuned.json
	$(PY) -m benchmarks.cpu_layer --out benchmarks/results/cpu_layer_default.json
	$(PY) -m benchmarks.cpu_layer --allocator tuned --out benchmarks/results/cpu_layer_tuned.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
