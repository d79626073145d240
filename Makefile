# Two commands do all set-up on a fresh machine:
#   make demo   creates .venv from pyproject.toml and runs the quickstart study on the embedded default
#   make test   creates .venv from pyproject.toml and runs the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test env clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, so that sam2 can build against it without build isolation (and without CUDA).
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.2"
	SAM2_BUILD_CUDA=0 $(BIN)/pip install -q --no-build-isolation "sam2==1.1.0"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

env: $(BIN)/.installed

demo: env
	$(BIN)/python -m study.run examples/quickstart.yaml

test: env
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
