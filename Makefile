# Quick start: `make demo` (prepare tiny-shakespeare, train the CPU recipe, sample) and `make test`.
# Both create .venv on first use and install what they need. Set PYTHON to pick the interpreter.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test test-all bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) data/prepare.py data=shakespeare_char
	$(PY) train.py experiment=shakespeare_char_cpu
	$(PY) sample.py checkpoint=out/shakespeare_char_cpu prompt="ROMEO:" num_samples=2 max_new_tokens=300

# The test command (README, CI). Slow tests are included; `-m "not slow"` skips them while iterating.
test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)
