# neuronscope: `make setup` builds .venv with everything; `make test` runs the whole suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test lint bench clean

setup:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch pinned: 2.13.0 (CPU) lies on this machine's disk; an open range would pull a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	# compile the numba fold of corpus statistics once (~10 s); later processes load the cached machine code
	$(BIN)/python -m neuronscope.stats.fold_cpu
	bash scripts/setup_system.sh

# lint and types first: `make test` fails when ruff or mypy does (the config is in pyproject.toml)
test: lint
	$(BIN)/python -m pytest -n 2 --dist loadgroup -q

lint:
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

# The benchmark gets its own venv: the peer libraries (nnsight, pyvene, transformer-lens) never enter .venv.
BENCH_VENV := .venv-bench
BENCH_ARGS ?= --models stories,smollm --repeats 11

bench:
	test -x $(BENCH_VENV)/bin/python || $(PY) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet torch==2.13.0
	$(BENCH_VENV)/bin/pip install --quiet -e '.[bench]'
	$(BENCH_VENV)/bin/python bench/capture.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info
