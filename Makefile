# neuronscope: `make setup` builds .venv with everything; `make test` runs the whole suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test bench clean

setup:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch pinned: 2.13.0 (CPU) lies on this machine's disk; an open range would pull a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	bash scripts/setup_system.sh

test:
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q

bench:
	$(BIN)/pip install --quiet -e '.[bench]'

clean:
	rm -rf $(VENV) build dist *.egg-info
