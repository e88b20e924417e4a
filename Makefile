# One command each: `make test` (ruff + pytest) and `make demo` (train + evaluate on synthetic shapes).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Tuned for XLA:CPU (see ../shared/reference/jax_stack.md, deformable attention section).
export XLA_FLAGS ?= --xla_cpu_experimental_ynn_fusion_type=-reduce

.PHONY: setup setup-torch test lint demo clean

setup: $(STAMP)

# torch (CPU wheel, pinned) for the PyTorch parity tests; `make test` installs it, `make demo` does not need it.
setup-torch: $(VENV)/.torch
$(VENV)/.torch: $(STAMP)
	$(BIN)/python -m pip install -q 'torch==2.13.0' || (echo 'pip failed; retrying once' && $(BIN)/python -m pip install -q 'torch==2.13.0')
	touch $(VENV)/.torch

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# One retry: a cold install sometimes fails transiently unpacking array_record.
	$(BIN)/python -m pip install -q -e '.[test]' || (echo 'pip failed; retrying once' && $(BIN)/python -m pip install -q -e '.[test]')
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint setup-torch
	$(BIN)/python -m pytest -n 2 --dist loadfile tests

demo: setup
	$(BIN)/python -m dimaskdino_jax.demo --workdir runs/demo

clean:
	rm -rf $(VENV) runs
