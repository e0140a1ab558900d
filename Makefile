# The two commands of the README:  make demo   and   make test
# Both create .venv with Python 3.11 (override: make PYTHON=python3.12 ...), install torch's CPU build
# first (an unpinned torch pulls a multi-GB CUDA build), then the project with every extra
# in `all` (not gurobi: its licence; not timm: it needs torchvision) and the test tools.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0

.PHONY: setup demo test clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/activate pyproject.toml
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[all,test]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/cbs demo --out results/demo
	@echo "The CLI is $(BIN)/cbs (or: source $(BIN)/activate, then cbs --help)."

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) results .pytest_cache
