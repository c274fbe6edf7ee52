# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv on first use.
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: demo test gpu-check

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: the CPU build. Letting pip resolve a bare "torch" pulls a CUDA build of several GB.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m kiln.demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --durations=15 tests
