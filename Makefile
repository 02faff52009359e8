# Two commands on a fresh machine: `make demo` (main job) and `make test` (ruff + pytest).
# Both create .venv/ and install mspec (editable, with dev extras) when needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mspec-installed
DEMO_DIR ?= demo_output

.PHONY: demo test lint bench bench-survey docs install clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.cfg
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check mspec tests benchmarks examples
	$(BIN)/ruff format --check mspec tests benchmarks examples

test: $(STAMP) lint
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/mspec --log $(DEMO_DIR)/demo.log demo --out $(DEMO_DIR)

# asv suite (one sample per case), then docs/benchmarks.md's generated section from the results.
# BENCH='regex' runs only the matching benchmarks (asv -b).
BENCH ?=
bench: $(STAMP)
	cd benchmarks && ../$(BIN)/asv machine --yes > /dev/null
	cd benchmarks && ../$(BIN)/asv run --python=same --quick --show-stderr \
		--set-commit-hash $$(git rev-parse HEAD) $(if $(BENCH),-b '$(BENCH)'); \
		rc=$$?; ../$(BIN)/python report.py; exit $$rc

# survey-scale run (simulated survey -> FITS -> ingest -> every stage on a LocalCluster); the
# result goes to benchmarks/results/survey_scale/, which `make bench` puts on the page
SURVEY_N ?= 100000
SURVEY_DIR ?= /tmp/mspec-survey-$(SURVEY_N)
bench-survey: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/survey_scale.py --n $(SURVEY_N) \
		--out $(SURVEY_DIR) --save benchmarks/results/survey_scale
	$(BIN)/python benchmarks/report.py

# documentation site (MkDocs + mkdocstrings), warnings are errors, into site/
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache .ruff_cache .hypothesis
