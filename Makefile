# Two commands on a fresh machine: `make run` and `make test`. Each makes or refreshes .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU build of torch for this kind of machine; users on GPUs install their own torch (pyproject asks torch>=2.4).
TORCH_PIN ?= torch==2.13.0
OUT ?= runs/demo

.PHONY: venv sysdeps run test lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_PIN)"
	$(BIN)/pip install -q -e ".[dev,tokenizers]" "$(TORCH_PIN)"
	touch $(STAMP)

# System packages the tests read: WordNet 3.0 for NExT-OE's WUPS (NLTK reads /usr/share/wordnet; nothing is
# downloaded at run time). Installed with apt-get when run as root (CI); otherwise the command to run is printed.
sysdeps:
	@if [ ! -f /usr/share/wordnet/data.noun ]; then \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	        (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q wordnet-base) >/dev/null; \
	    else \
	        echo "WordNet missing: run 'sudo apt-get install wordnet-base' (the WUPS tests fail without it)" >&2; \
	    fi; \
	fi

run: venv
	$(BIN)/mirasol demo --out $(OUT)

test: venv sysdeps
	$(BIN)/python -m pytest -q -ra --durations=15 tests

lint: venv
	$(BIN)/ruff check mirasol_ray benchmarks tests jobs

clean:
	rm -rf $(VENV) runs .pytest_cache
