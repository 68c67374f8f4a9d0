# Two commands on a fresh machine: `make run` and `make test`. Each makes or refreshes .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU build of torch for this kind of machine; users on GPUs install their own torch (pyproject asks torch>=2.4).
TORCH_PIN ?= torch==2.13.0
OUT ?= runs/demo

.PHONY: venv run test lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[dev,tokenizers]" "$(TORCH_PIN)"
	touch $(STAMP)

run: venv
	$(BIN)/mirasol demo --out $(OUT)

test: venv
	$(BIN)/python -m pytest -q -ra tests

lint: venv
	$(BIN)/ruff check mirasol_ray tests jobs

clean:
	rm -rf $(VENV) runs .pytest_cache
