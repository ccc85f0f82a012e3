# Two commands do all the set-up on a fresh machine:
#   make serve   -> creates .venv, installs the project, serves the bundled demo model
#   make test    -> creates .venv, installs the project with dev extras, runs lint, types and tests
PYTHON ?= python3
VENV ?= .venv
# CPU build of torch by default; on a GPU host: make TORCH_SPEC="torch" ...
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev

.PHONY: serve test lint typecheck pytest bench-cpu clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/tssc serve $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check --no-cache .
	$(VENV)/bin/ruff format --no-cache --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# pytest exits 5 when it collects nothing: that is not a failure of the suite.
pytest: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

test: lint typecheck pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

bench-cpu: $(STAMP)
	$(PY) bench/ttft_cpu.py
