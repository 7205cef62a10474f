# The two commands a new user needs: `make demo` and `make test`.
# Both create or reuse .venv and install what is missing (CPU torch first, so pip never pulls a
# multi-GB CUDA build), then run.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO := out/demo

.PHONY: install system-packages lint test test-fast demo bench clean-demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): setup.py | $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e ".[all]"
	@touch $(STAMP)

install: $(STAMP)

# what the tests need from the system (as root, Debian): espeak-ng speaks the VAD test's speech,
# Chromium and its driver open the HTML pages in the browser tests
SYSTEM_PACKAGES := espeak-ng chromium chromium-driver
system-packages:
	@command -v espeak-ng >/dev/null && command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $(SYSTEM_PACKAGES); }

lint: install
	$(BIN)/lint-imports

# the full suite, as CI runs it
test: lint
	$(BIN)/python -m pytest -q tests

# for development: skips the tests marked slow (engines, clusters, browsers, training runs)
test-fast: lint
	$(BIN)/python -m pytest -q tests -m "not slow"

demo: install
	$(BIN)/python -m pipeline.demo --out $(DEMO)

bench: install
	for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

clean-demo:
	rm -rf $(DEMO) data/sample
