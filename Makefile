# One command each: `make test` (ruff + pytest) and `make demo` (train + evaluate on synthetic shapes).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# XLA_FLAGS for XLA:CPU and glibc's malloc tunables come from dimaskdino_jax/runtime.py: the entry points (the demo)
# set them themselves, and the test run goes through its command runner.

.PHONY: setup setup-torch setup-cuda-compile test lint demo clean gpu-wheels official-src

setup: $(STAMP)

# torch (CPU wheel, pinned) for the PyTorch parity tests; `make test` installs it, `make demo` does not need it.
setup-torch: $(VENV)/.torch
$(VENV)/.torch: $(STAMP)
	$(BIN)/python -m pip install -q 'torch==2.13.0' || (echo 'pip failed; retrying once' && $(BIN)/python -m pip install -q 'torch==2.13.0')
	touch $(VENV)/.torch

# jaxlib's CUDA plugin (its Triton compiler) and ptxas, to compile the Pallas kernels to GPU machine code on a
# machine without a GPU (kernels/ms_deform_attn/cuda_compile.py, tests/kernels/test_cuda_compile.py). Installed
# beside the venv's site-packages, not into it, so jax in the venv stays CPU-only; only that check puts it on
# PYTHONPATH. The plugin's version must equal jaxlib's.
CUDA_COMPILE := $(VENV)/cuda-compile
setup-cuda-compile: $(VENV)/.cuda-compile
$(VENV)/.cuda-compile: $(STAMP)
	v=$$($(BIN)/python -c 'import jaxlib; print(jaxlib.__version__)') && pkgs="jax-cuda12-plugin==$$v jax-cuda12-pjrt==$$v nvidia-cuda-nvcc-cu12==12.9.86" && \
	  ($(BIN)/python -m pip install -q --no-deps --upgrade --target $(CUDA_COMPILE) $$pkgs || (echo 'pip failed; retrying once' && $(BIN)/python -m pip install -q --no-deps --upgrade --target $(CUDA_COMPILE) $$pkgs))
	touch $@

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# One retry: a cold install sometimes fails transiently unpacking array_record.
	$(BIN)/python -m pip install -q -e '.[test]' || (echo 'pip failed; retrying once' && $(BIN)/python -m pip install -q -e '.[test]')
	touch $(STAMP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# pytest under glibc's malloc tunables (dimaskdino_jax/runtime.py; the entry points restart with them themselves).
test: lint setup-torch setup-cuda-compile
	$(BIN)/python -m dimaskdino_jax.runtime $(BIN)/python -m pytest -n 2 --dist loadfile tests

demo: setup
	$(BIN)/python -m dimaskdino_jax.demo --workdir runs/demo

# The GPU check (benchmarks/gpu_check.py, README "Running the GPU check"): the Python 3.12 manylinux x86-64 wheels of
# the packages the GPU machine lacks, into an ignored folder, with a size check (at most 50 MiB); and the source files
# of the official code for its check 5, into another. Any python with pip will do; neither touches the venv.
GPU_WHEELS ?= .whl
gpu-wheels:
	$(PY) benchmarks/gpu_check.py --download-wheels $(GPU_WHEELS)

OFFICIAL_DIMASKDINO ?= /work/official/DI-MaskDINO
OFFICIAL_DETECTRON2 ?= /work/official/detectron2
official-src:
	$(PY) benchmarks/gpu_check.py --prepare-official $(OFFICIAL_DIMASKDINO) $(OFFICIAL_DETECTRON2) --dest .official

clean:
	rm -rf $(VENV) runs
