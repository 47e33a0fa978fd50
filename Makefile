# Quick start: `make demo` (prepare tiny-shakespeare, train the CPU recipe, sample) and `make test`.
# Both create .venv on first use and install what they need. Set PYTHON to pick the interpreter.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-slow test-all lint gpu-check

# PyTorch goes in first, so that installing the package finds it there. PyPI's default torch is a multi-GB CUDA
# build: right for a machine with an NVIDIA GPU, wasted on one without, which gets the CPU build instead.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "PyTorch is already in $(VENV)"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
	  echo "NVIDIA GPU found: installing PyTorch with CUDA (several GB)"; \
	  $(PY) -m pip install -q torch; \
	else \
	  echo "no NVIDIA GPU (nvidia-smi not found): installing the CPU build of PyTorch from $(TORCH_CPU_INDEX)"; \
	  $(PY) -m pip install -q torch --index-url $(TORCH_CPU_INDEX); \
	fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) data/prepare.py data=shakespeare_char
	$(PY) train.py experiment=shakespeare_char_cpu
	$(PY) sample.py checkpoint=out/shakespeare_char_cpu prompt="ROMEO:" num_samples=2 max_new_tokens=300

# The test command (README, CI): everything but the tests marked slow (about 5 minutes on 2 CPU cores).
# CI also runs `make test-slow` (multi-process, compile, packaging, GGUF, half-precision LoRA and end-to-end demo runs: about 8 minutes).
test: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# ruff's linter and formatter, as pyproject.toml configures them (CI runs this; `ruff format .` fixes the format).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# On a CUDA machine: PASS/FAIL for training (bf16 + compile, fp16 + GradScaler), fused AdamW, flash attention,
# KV-cache sampling, resume after SIGTERM and, with 2+ GPUs, NCCL DDP; records its table in BENCHMARKS.md.
gpu-check: install
	$(PY) bench/gpu_check.py
