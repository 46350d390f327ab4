# fastkd: `make demo` runs the main job on the built-in sample data, `make test` runs the tests.
# Both create/refresh the virtual environment .venv in this checkout and install everything.

VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.fastkd-installed
# The nvcc on PATH may be a wrapper script: point CUDA_HOME at the toolkit's real folder.
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda-13.0 /usr/local/cuda))
export CUDA_HOME
SOURCES := setup.py csrc/isa_flags.txt fastkd/__init__.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: venv test pytest ctest kernel-check demo bench clean test-compat compat-venv test-oldest

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

# Second environment with the lent GPU machine's software: Python 3.12, torch 2.11 / torchvision 0.26 /
# triton 3.6 from PyPI (torch's CUDA 13 wheels: on this CPU-only machine too they need their nvidia-*
# libraries to import), the newest numpy, timm 1.0.31, no DALI, no xformers. The environment is built
# once per clone (stamp file; pip's cache makes a rebuild mostly a re-install): fastkd is installed by
# `bash tests/gpu/run_gpu_suite.sh`, i.e. with the lent machine's install line
# (`pip install --no-build-isolation --no-deps -e .`, CUDA sources included), followed by the GPU suite,
# whose every check must skip without CUDA. `make test-compat` then runs the op, kernel, loss, method,
# model and trainer tests there (Triton interpreter), the GPU suite's collection and skips, and the
# ahead-of-time compile check (sm_80 / sm_90) with triton 3.6. Not included: tests/data (DALI), eval,
# the CLI and benchmark tests.
COMPAT_VENV   ?= .venv-compat
COMPAT_PY     := $(COMPAT_VENV)/bin/python
COMPAT_STAMP  := $(COMPAT_VENV)/.fastkd-installed
COMPAT_PYVER  ?= 3.12
COMPAT_PINS   ?= torch==2.11.0 torchvision==0.26.0 triton==3.6.0 timm==1.0.31 numpy
COMPAT_TESTS  ?= tests/ops tests/kernels tests/losses tests/methods tests/models tests/train
COMPAT_REPORT := build/$(COMPAT_VENV:.%=%)
# The first interpreter that really is Python $(1) (a pyenv shim named python3.12 may not run).
find_python = $(firstword $(foreach p,python$(1) $(wildcard $(shell pyenv root 2>/dev/null)/versions/$(1).*/bin/python$(1)),\
	$(if $(shell $(p) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null | grep -x '$(1)'),$(p))))
COMPAT_PYTHON ?= $(call find_python,$(COMPAT_PYVER))
# fastkd._C is built in place (fastkd/_C<EXT_SUFFIX>): two environments of one Python version would
# overwrite each other's extension.
EXT_SUFFIX = $(shell $(1) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))' 2>/dev/null)

compat-venv: $(COMPAT_STAMP)

$(COMPAT_STAMP): $(SOURCES) tests/gpu/run_gpu_suite.sh
	@test -n "$(COMPAT_PYTHON)" || { echo "$(COMPAT_VENV) needs Python $(COMPAT_PYVER) (none found; set COMPAT_PYTHON)"; exit 1; }
	@for other in $(filter-out $(COMPAT_VENV),$(wildcard .venv .venv-*)); do \
		if [ -x $$other/bin/python ] && [ "$$($$other/bin/python -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')" = "$(call EXT_SUFFIX,$(COMPAT_PYTHON))" ]; then \
			echo "$(COMPAT_PYTHON) has the Python version of $$other: their in-place fastkd._C would clash"; exit 1; fi; done
	test -x $(COMPAT_PY) || $(COMPAT_PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install --quiet --upgrade pip setuptools wheel ninja
	$(COMPAT_PY) -m pip install --quiet $(COMPAT_PINS) pytest pyyaml pillow tqdm matplotlib tensorboard scikit-image
	mkdir -p $(COMPAT_REPORT)
	PYTHON=$(COMPAT_PY) OUT=$(COMPAT_REPORT) bash tests/gpu/run_gpu_suite.sh > $(COMPAT_REPORT)/install.log 2>&1 \
		|| { tail -n 40 $(COMPAT_REPORT)/install.log; exit 1; }
	tail -n 2 $(COMPAT_REPORT)/gpu_suite.txt
	touch $(COMPAT_STAMP)

test-compat: compat-venv
	mkdir -p $(COMPAT_REPORT)
	@$(COMPAT_PY) -c 'import sys, numpy, torch, torchvision, triton, timm; print("$(COMPAT_VENV): python", sys.version.split()[0], "torch", torch.__version__, "torchvision", torchvision.__version__, "triton", triton.__version__, "numpy", numpy.__version__, "timm", timm.__version__)'
	$(COMPAT_PY) -m pytest -q -p no:cacheprovider -rs $(COMPAT_TESTS)
	FASTKD_GPU_TESTS=1 $(COMPAT_PY) -m pytest -m gpu -q -p no:cacheprovider tests/gpu > $(COMPAT_REPORT)/gpu_collect.log 2>&1 \
		|| { tail -n 40 $(COMPAT_REPORT)/gpu_collect.log; exit 1; }
	tail -n 2 $(COMPAT_REPORT)/gpu_collect.log
	$(COMPAT_VENV)/bin/fastkd bench compile --out $(COMPAT_REPORT)/kernel_check > $(COMPAT_REPORT)/kernel_check.log 2>&1 \
		|| { tail -n 40 $(COMPAT_REPORT)/kernel_check.log; exit 1; }
	tail -n 2 $(COMPAT_REPORT)/kernel_check.log

# The oldest supported versions (setup.py's floor), tested the same way in .venv-oldest, on demand (not
# in CI): Python 3.10, torch 2.11 / torchvision 0.26 / triton 3.6, timm 1.0.23, the newest numpy for
# Python 3.10. (torch 2.4 / triton 3.0, the floor stated before, fail: fastkd._C needs at::vec::fnmadd
# and the ops' schemas are inferred from string annotations, which torch 2.4's custom_op rejects.)
test-oldest:
	$(MAKE) --no-print-directory test-compat COMPAT_VENV=.venv-oldest COMPAT_PYVER=3.10 \
		COMPAT_PINS="torch==2.11.0 torchvision==0.26.0 triton==3.6.0 timm==1.0.23 numpy"

demo: venv
	$(PY) -m fastkd.demo

# --publish: into the published results benchmarks/results/ of this checkout
bench: venv
	$(VENV)/bin/fastkd bench all --publish
	$(VENV)/bin/fastkd bench backbone --publish
	$(VENV)/bin/fastkd bench knn --publish

clean:
	rm -rf build $(VENV) $(COMPAT_VENV) fastkd/_C*.so *.egg-info
