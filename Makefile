# `make demo` and `make test` set everything up on first use (.venv, pinned CPU torch).
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTHON  ?= python3
LINTED  := stages flows tests benchmarks datasets

.PHONY: demo test lint install browser clean-runs

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/refit demo

lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check --quiet $(LINTED)

# headless Chromium for the browser test (tests/test_ui.py), which is skipped where it cannot be installed
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
		|| echo "chromium not installed (needs root and apt-get): the browser test will be skipped"

test: lint browser
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

clean-runs:
	rm -rf runs
