# Two commands on a fresh machine: `make demo` (main job) and `make test` (ruff + pytest).
# Both create .venv/ and install mspec (editable, with dev extras) when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mspec-installed
DEMO_DIR ?= demo_output

.PHONY: demo test lint bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.cfg
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check mspec tests benchmarks examples

test: $(STAMP) lint
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/mspec --log $(DEMO_DIR)/demo.log demo --out $(DEMO_DIR)

bench: $(STAMP)
	cd benchmarks && ../$(BIN)/asv run --python=same --quick --show-stderr

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .ruff_cache .hypothesis
