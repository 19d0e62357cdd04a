# The two commands of the README. Each makes and reuses .venv by itself.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_STAMP := $(VENV)/.installed-demo
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test lint typecheck pytest notebooks clean bench-accel

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The library and the training app.
$(DEMO_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[train]'
	touch $(DEMO_STAMP)

# Everything the tests need. PyTorch (CPU) goes in first, so that transformers and peft
# find it and do not pull a CUDA build.
$(TEST_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev,train,interop]'
	touch $(TEST_STAMP) $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/python -m train

# The accelerator measurement (README, "On accelerators"; bounded to 8 minutes in all):
# prints the table and writes bench-accel.json. ACCEL_JAX=cuda12 (or tpu) first installs
# that build of the JAX version already in the venv (needs the network).
ACCEL_JAX ?=
bench-accel: $(DEMO_STAMP)
	$(if $(ACCEL_JAX),$(BIN)/python -m pip install --quiet "jax[$(ACCEL_JAX)]==$$($(BIN)/python -c 'import jax; print(jax.__version__)')")
	$(BIN)/python -m train.benchmark --part accelerator --json bench-accel.json

lint: $(TEST_STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

typecheck: $(TEST_STAMP)
	$(BIN)/mypy

pytest: $(TEST_STAMP)
	$(BIN)/pytest -n auto -q

test: lint typecheck pytest

# Re-run the notebooks and write their outputs back (commit them: they read on GitHub).
notebooks: $(TEST_STAMP)
	$(BIN)/pytest -q -n auto --overwrite notebooks

clean:
	rm -rf $(VENV)
