# Everything runs inside .venv, created on first use. Override VENV / PYTHON / TORCH_VERSION if needed.
VENV ?= .venv
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install test test-all demo bench clean

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

# The test command of README.md and CI: offline, CPU only.
test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

# Also the tests marked slow.
test-all: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) examples/demo.py

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench_towers.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
