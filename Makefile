# `make demo` and `make test` set everything up on first use: .venv with exactly the versions
# in requirements.lock (every dependency, the CPU torch build included), then Refit itself.
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTHON  ?= python3
LINTED  := stages flows tests benchmarks datasets

LOCKED  := --extra dev --strip-extras --no-emit-index-url --no-emit-find-links --no-emit-trusted-host

.PHONY: demo test test-fast lint docs install lock browser clean-runs

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# the newest releases within pyproject.toml's ranges; then `make test` and commit the lock with its result
lock: $(STAMP)
	$(BIN)/pip-compile --quiet --upgrade $(LOCKED) -o requirements.lock pyproject.toml
	$(MAKE) install

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/refit demo

# style, then the layers: import-linter's contracts in pyproject.toml
lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check --quiet $(LINTED)
	$(BIN)/lint-imports

# the recipe reference, from the field docstrings (tests/test_docs.py fails when it is stale)
docs: $(STAMP)
	$(BIN)/python -m refit.flows.recipe_reference > docs/recipe.md

# headless Chromium for the browser test (tests/flows/test_ui.py), which is skipped where it cannot be installed
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } \
		|| echo "chromium not installed (needs root and apt-get): the browser test will be skipped"

# TEST_WORKERS=2: two pytest workers (pytest-xdist; tests sharing a resource name an xdist_group).
# Serial by default until a quiet-machine measurement shows the workers pay on 2 cores.
TEST_WORKERS ?= 0
PYTEST  := HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup

test: lint browser
	$(PYTEST)

# the tests that start no training and no server
test-fast: lint
	$(PYTEST) -m "not slow"

clean-runs:
	rm -rf runs
