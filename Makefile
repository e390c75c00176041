# The two commands the README gives: `make setup` once on a fresh machine, then `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup test test-fast demo benchmark docs

# torch is pinned and installed first: the CPU build (a local wheel on these machines); left to
# peft's resolver, pip would download a CUDA build of several GB.
setup:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[cpu,train,serve,voting,zarr,reference,dask,dev,bench,docs]"

# two test processes (pytest-xdist); tests that share an expensive module fixture carry one xdist_group
test:
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

# while developing: readers, genes, normalisation, calls, bad input and model directories; no training (under a minute)
test-fast:
	$(BIN)/python -m pytest -q tests/test_readers.py tests/test_bad_input.py tests/test_calls.py tests/test_model_dir.py

demo:
	$(BIN)/scl-demo --out demo_out --overwrite

benchmark:
	$(BIN)/python benchmarks/run.py

# the reference pages in docs/ and the API reference from the docstrings; any warning fails the build
docs:
	$(BIN)/python -m sphinx -W --keep-going -q -b html docs docs/_build/html
