# `make demo` and `make test` set everything up on first use (.venv, pinned CPU torch).
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTHON  ?= python3

.PHONY: demo test install clean-runs

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/refit demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

clean-runs:
	rm -rf runs
