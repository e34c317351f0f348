# Two quickstart commands: `make serve` and `make test`. Each makes .venv and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: serve test lint bench clean

$(BIN)/python:
	@echo "==> creating $(VENV), keyplane's own Python environment"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Not quiet: a first install takes a minute or two, and pip's "Collecting …" lines show it moving.
$(VENV)/.run-installed: pyproject.toml | $(BIN)/python
	@echo "==> installing keyplane and its dependencies into $(VENV) (first time only; later runs start at once)"
	$(BIN)/python -m pip install --progress-bar on --disable-pip-version-check -e .
	touch $@

$(VENV)/.test-installed: pyproject.toml tests/mcp_ts_client/package-lock.json | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	npm ci --prefix tests/mcp_ts_client --no-audit --no-fund --loglevel=error
	command -v chromium >/dev/null || apt-get install -y -q chromium >/dev/null  # browser tests (Debian's, no download)
	touch $@ $(VENV)/.run-installed

serve: $(VENV)/.run-installed
	@echo "==> starting keyplane (another port: KEYPLANE_PORT=9000 make serve; every setting: docs/configuration.md)"
	$(BIN)/keyplane serve

test: $(VENV)/.test-installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2 --dist loadgroup --durations=25  # two workers; see PROCESS_TEST_GROUPS in tests/conftest.py

lint: $(VENV)/.test-installed
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
