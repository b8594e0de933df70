# The two commands: `make run` (proxy :3000 + dashboard :3001, SQLite under ./data) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

CLAUDE_CODE := tests/claude_code/node_modules/.bin/claude

.PHONY: run test lint typecheck format bench clean install claude-code

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# Open development mode: the dashboard on :3001 has no authentication (prompttrain up announces it).
run: $(STAMP)
	@mkdir -p data
	DASHBOARD_OPEN=true $(BIN)/prompttrain up

# Claude Code itself (pinned in tests/claude_code) drives the end-to-end tests; without npm they are skipped
# (under CI=true they fail instead).
CLAUDE_STAMP := tests/claude_code/node_modules/.installed
claude-code:
	@if [ -f $(CLAUDE_STAMP) ] && [ $(CLAUDE_STAMP) -nt tests/claude_code/package-lock.json ]; then :; \
	elif command -v npm >/dev/null 2>&1; then \
	  npm ci --prefix tests/claude_code --no-audit --no-fund --loglevel=error && touch $(CLAUDE_STAMP); \
	else echo "npm not found: the Claude Code tests will be skipped"; fi

test: $(STAMP) claude-code
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

bench: $(STAMP)
	$(BIN)/python bench/proxy_overhead.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache tests/claude_code/node_modules
