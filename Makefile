# The two commands: `make demo` and `make test`. Each creates .venv when missing and installs
# what it needs. torch is pinned so pip takes the CPU wheel on disk, not a multi-GB CUDA build.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
TORCH  ?= torch==2.13.0

.PHONY: demo test lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Stamps re-run the install only when pyproject.toml changes.
$(VENV)/.demo-installed: pyproject.toml | $(PY)
	$(PIP) install "$(TORCH)"
	$(PIP) install -e .
	touch $@

$(VENV)/.test-installed: pyproject.toml $(VENV)/.demo-installed
	$(PIP) install -e ".[dev,keras,onnx,hf]"
	touch $@

demo: $(VENV)/.demo-installed
	$(VENV)/bin/nnopt demo

test: $(VENV)/.test-installed
	$(PY) -m pytest -q

lint: $(VENV)/.test-installed
	$(VENV)/bin/ruff check nnopt tests examples

clean:
	rm -rf $(VENV) nnopt-report .pytest_cache
