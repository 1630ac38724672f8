# Two commands matter: `make demo` (once the local stack exists: today it runs the detector on a sample
# image) and `make test`. Both create .venv on first use.
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

# The tests start their own private Mosquitto; install it with the system package manager when missing.
mosquitto:
	@command -v mosquitto >/dev/null || test -x /usr/sbin/mosquitto || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto; \
	  else \
	    echo "The tests need the Mosquitto broker: sudo apt-get install mosquitto (or brew install mosquitto)"; \
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

demo: install
	$(BIN)/edgefleet detect $(SHARED)/data/images/bus.jpg --model $(SHARED)/models/yolov8n_int8.onnx --save runs/demo

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
