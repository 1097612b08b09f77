# Two entry points, each doing all set-up on a fresh machine with python3 and make:
#   make run   - create .venv, install l2o_jax, run the default (quick) job on CPU
#   make test  - create .venv with the test extra, run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
WORKDIR ?= runs/quick
CONFIG ?= experiments/configs/quick.py

.PHONY: run test venv clean bench

$(VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,report]'
	touch $@

venv: $(VENV)/.stamp

run: $(VENV)/.stamp
	JAX_PLATFORMS=cpu $(PY) -m experiments.main --config=$(CONFIG) --workdir=$(WORKDIR)
	JAX_PLATFORMS=cpu $(PY) -m experiments.report $(WORKDIR)

test: $(VENV)/.stamp
	JAX_PLATFORMS=cpu $(PY) -m pytest tests

bench: $(VENV)/.stamp
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) runs
