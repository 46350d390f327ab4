# fastkd: `make demo` runs the main job on the built-in sample data, `make test` runs the tests.
# Both create/refresh the virtual environment .venv in this checkout and install everything.

VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.fastkd-installed
# The nvcc on PATH may be a wrapper script: point CUDA_HOME at the toolkit's real folder.
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda-13.0 /usr/local/cuda))
export CUDA_HOME
SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: venv test pytest ctest kernel-check demo bench clean

venv: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel ninja
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.14.1 torchvision==0.29.1
	$(PIP) install --no-build-isolation --editable ".[dev,dali]"
	touch $(STAMP)

test: venv pytest ctest kernel-check

pytest: venv
	$(PY) -m pytest -q tests

# find_package(Torch) of a CUDA torch needs the toolkit's real folder (not the nvcc wrapper's).
ctest: venv
	$(VENV)/bin/cmake -S . -B build/cmake -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja \
		-DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
		-DPython3_EXECUTABLE=$(abspath $(PY)) \
		$(if $(CUDA_HOME),-DCUDA_TOOLKIT_ROOT_DIR=$(CUDA_HOME) -DCUDAToolkit_ROOT=$(CUDA_HOME))
	$(VENV)/bin/cmake --build build/cmake
	cd build/cmake && $(abspath $(VENV))/bin/ctest --output-on-failure

# GPU suite (tests/gpu): the compiled Triton kernels and fastkd._C's CUDA kernels against their
# references, 20-step bf16 training of every method, `fastkd bench ops --device cuda --quick`; one
# PASS|FAIL|SKIP line per check (every check SKIPs without CUDA). Uses .venv when it exists; else the
# system python3 (a machine that already has torch, triton and timm): fastkd is built in place with
# `pip install --no-build-isolation --no-deps -e .`, nothing else is installed. Bounded to 450 s from
# the start of the recipe (FASTKD_GPU_DEADLINE).
GPU_PY = $(if $(wildcard $(PY)),$(PY),python3)
GPU_INSTALL = $(if $(wildcard $(PY)),$(MAKE) --no-print-directory venv,python3 -m pip install --no-build-isolation --no-deps -e .)

.PHONY: gpu-test
gpu-test:
	@start=$$(date +%s); \
	$(GPU_INSTALL) && \
	FASTKD_GPU_TESTS=1 FASTKD_GPU_DEADLINE=$${FASTKD_GPU_DEADLINE:-$$((start + 450))} \
		$(GPU_PY) -m pytest -m gpu -q -p no:cacheprovider tests/gpu

# Ahead-of-time Triton compile check (exit 1 on a spill or failure); report in the git-ignored build/kernel_check/
kernel-check: venv
	$(VENV)/bin/fastkd bench compile

demo: venv
	$(PY) -m fastkd.demo

# --publish: into the published results benchmarks/results/ of this checkout
bench: venv
	$(VENV)/bin/fastkd bench all --publish
	$(VENV)/bin/fastkd bench backbone --publish
	$(VENV)/bin/fastkd bench knn --publish

clean:
	rm -rf build $(VENV) fastkd/_C*.so *.egg-info
