# Two commands matter: `make demo` (the whole fleet on this machine: `edgefleet up`) and `make test`.
# Both create .venv on first use and install Mosquitto with the system package manager when it is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHARED ?= ../shared

.PHONY: install mosquitto chromium test lint demo clean

$(BIN)/edgefleet: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(BIN)/edgefleet

install: $(BIN)/edgefleet

# `edgefleet up` and the tests start their own private Mosquitto; install it with the system package manager
# when it is missing and that is allowed (root with apt-get), else say what to install.
mosquitto:
	@command -v mosquitto >/dev/null || test -x /usr/sbin/mosquitto || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto; \
	  else \
	    echo "edgefleet needs the Mosquitto broker: sudo apt-get install mosquitto (or brew install mosquitto)"; \
	    exit 1; \
	  fi; }

# The dashboard's browser tests drive Chromium through Playwright; Debian's chromium package is used as is
# (Playwright's own browser download is not needed). macOS: brew install --cask chromium.
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	  else \
	    echo "The dashboard tests need Chromium: sudo apt-get install chromium (or set EDGEFLEET_CHROMIUM)"; \
	    exit 1; \
	  fi; }

test: install mosquitto chromium
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Broker, fleet manager, refiner and three agents on the sample video and photos, then a canary rollout;
# Ctrl-C stops everything. State stays in runs/stack (`edgefleet up --reset` starts afresh).
demo: install mosquitto
	$(BIN)/edgefleet up --shared $(SHARED)

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
