# Two entry points, each self-contained on a fresh machine:
#   make demo   set up .venv, then expand -> train with routing -> report -> export the tiny default
#   make test   set up .venv, then run the whole test suite (CPU; Triton kernels in interpreter mode)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build on this kind of machine; a CUDA user sets TORCH_SPEC to their build.
TORCH_SPEC ?= torch==2.13.0
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM = false

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/python -m dlo.demo

test: setup
	$(BIN)/python -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf runs .pytest_cache
