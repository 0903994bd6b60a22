# Two commands do everything: `make demo` and `make test`. Both create or refresh .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHON VENV

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml tools/venv.sh
	bash tools/venv.sh

demo: $(VENV)/.installed
	$(PY) examples/digits_mlp.py

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

lint: $(VENV)/.installed
	$(PY) -m ruff check loopkit tests examples benchmarks
	$(PY) -m ruff format --check loopkit tests examples benchmarks

bench: $(VENV)/.installed
	$(PY) -m pytest benchmarks --benchmark-columns=median,iqr,ops

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .benchmarks
