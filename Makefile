# The two commands of the README: `make serve` and `make test`. Each creates the virtual
# environment in .venv (pip, pinned versions) the first time, and again when requirements change.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STEP ?= step11_multigpu# the newest step
MODEL ?= gemma-3-270m
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: serve test venv clean-venv cluster

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

serve: venv
	$(PY) -m $(STEP) --model $(MODEL) --host $(HOST) --port $(PORT)

# Beyond one server (cluster/README.md): two step 08 replicas on a local Ray behind the router
cluster: venv
	$(PY) -m cluster --step step08_quant --replicas 2 --policy prefix-affinity --model $(MODEL) --host $(HOST) --port $(PORT)

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
