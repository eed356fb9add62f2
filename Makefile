# Two commands: `make demo` and `make test`. Each sets up .venv on first use. `make test-fast` is the inner
# loop (no notebooks, no test marked slow); `make lint` runs ruff.
# `make notebooks-docs` re-executes the tutorials into docs/notebooks/ (outputs kept, a few minutes).
PY      ?= python3
VENV    ?= .venv
BIN      = $(VENV)/bin
# CPU wheel (on these machines it lies on disk); a GPU user sets TORCH_SPEC to a CUDA build or installs torch first.
TORCH_SPEC ?= torch==2.13.0
STAMP    = $(VENV)/.installed
# Test processes (pytest-xdist, whole modules to a process): each runs torch on one thread.
JOBS    ?= 2
XDIST    = -n $(JOBS) --dist loadscope --no-loadscope-reorder

.PHONY: install demo test test-fast lint notebooks-docs clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)" || $(BIN)/python -m pip install -q torch
	$(BIN)/python -m pip install -q -e ".[dev,notebooks]"
	touch $(STAMP)

demo: install
	$(BIN)/unike demo

test: install
	$(BIN)/python -m pytest -q $(XDIST)

test-fast: install
	$(BIN)/python -m pytest -q $(XDIST) -m "not slow" tests

notebooks-docs: install
	$(BIN)/python scripts/publish_notebooks.py

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
