# Two commands matter: `make demo` (once the local stack exists: today it runs the detector on a sample
# image) and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SHARED ?= ../shared

.PHONY: install test lint demo clean

$(BIN)/edgefleet: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(BIN)/edgefleet

install: $(BIN)/edgefleet

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

demo: install
	$(BIN)/edgefleet detect $(SHARED)/data/images/bus.jpg --model $(SHARED)/models/yolov8n_int8.onnx --save runs/demo

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
