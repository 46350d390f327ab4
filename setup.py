"""Build and install fastkd.

The extension ``fastkd._C`` is built with ``torch.utils.cpp_extension`` (ninja):
- the C++ (CPU) sources ``csrc/*.cpp`` always;
- the CUDA sources ``csrc/cuda/*.cu`` whenever torch is a CUDA build and a CUDA toolkit is found
  (``CUDA_HOME``), for ``TORCH_CUDA_ARCH_LIST`` (default ``8.0;9.0``). ``FASTKD_BUILD_CUDA=0|1``
  forces the choice either way.

torch is imported here, so install with ``pip install --no-build-isolation .``: the build uses the
torch you already have (CPU or CUDA) and never replaces it.
"""

import glob
import os
import re

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
# The version's one home is fastkd/__init__.py (CMakeLists.txt reads it there too).
with open(os.path.join(HERE, "fastkd", "__init__.py")) as handle:
    VERSION = re.search(r'^__version__ = "([^"]+)"', handle.read(), re.M).group(1)


def _cuda_requested(torch, cuda_home):
    flag = os.environ.get("FASTKD_BUILD_CUDA")
    if flag not in (None, "", "0", "1"):
        raise ValueError(f"FASTKD_BUILD_CUDA must be 0 or 1, got {flag!r}")
    usable = cuda_home is not None and os.path.isfile(os.path.join(cuda_home, "include", "cuda_runtime.h"))
    if flag == "1":
        if not usable:
            raise RuntimeError(
                f"FASTKD_BUILD_CUDA=1 but no usable CUDA toolkit was found (CUDA_HOME={cuda_home!r} has no "
                "include/cuda_runtime.h): set CUDA_HOME to the toolkit's real folder, e.g. /usr/local/cuda"
            )
        return True
    if flag == "0":
        return False
    if torch.version.cuda is not None and cuda_home is not None and not usable:
        print(f"fastkd: CUDA_HOME={cuda_home!r} is not a usable CUDA toolkit; building the CPU sources only")
    return torch.version.cuda is not None and usable


# Compiler flags per CPU vector ISA of the at::vec kernels: csrc/isa_flags.txt, the table CMakeLists.txt reads.
with open(os.path.join(HERE, "csrc", "isa_flags.txt")) as handle:
    CPU_ISA_FLAGS = {name: flags for name, *flags in (line.split() for line in handle if line.strip())
                     if not name.startswith("#")}


def _cpu_isa(torch):
    """``FASTKD_CPU_ISA`` if set, else the best ISA torch dispatches to on this (build) machine."""
    isa = os.environ.get("FASTKD_CPU_ISA") or torch.backends.cpu.get_cpu_capability()
    isa = isa.upper()
    if isa not in CPU_ISA_FLAGS:
        if "FASTKD_CPU_ISA" in os.environ:
            raise ValueError(f"FASTKD_CPU_ISA must be one of {sorted(CPU_ISA_FLAGS)}, got {isa!r}")
        isa = "DEFAULT"
    return isa


def _extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    if not cpp_sources:
        return []
    with_cuda = bool(cuda_sources) and _cuda_requested(torch, CUDA_HOME)
    isa = _cpu_isa(torch)
    # the ISA macros select at::vec's implementation; host C++ only (nvcc never sees them)
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", *CPU_ISA_FLAGS[isa], f"-DCPU_CAPABILITY={isa}",
                 f"-DCPU_CAPABILITY_{isa}"]
    macros = [("FASTKD_VERSION", f'"{VERSION}"')]
    if with_cuda:
        archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        macros += [("FASTKD_WITH_CUDA", "1"), ("FASTKD_CUDA_ARCHS", f'"{archs}"')]
        return [
            CUDAExtension(
                "fastkd._C",
                cpp_sources + cuda_sources,
                define_macros=macros,
                # no --use_fast_math: it flushes fp32 denormals to zero (ema_ of tiny weights must keep them)
                extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20"]},
                extra_link_args=["-fopenmp"],
            )
        ]
    return [
        CppExtension(
            "fastkd._C",
            cpp_sources,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ]


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=True)


setup(
    name="fastkd",
    version=VERSION,
    description="Kernel-backed self-supervised knowledge distillation for vision models",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "fastkd",
        "fastkd.ops",
        "fastkd.losses",
        "fastkd.models",
        "fastkd.methods",
        "fastkd.data",
        "fastkd.train",
        "fastkd.eval",
        "fastkd.kernels",
        "fastkd.benchmarks",
        "fastkd.configs",
        "fastkd.configs.demo",  # YAML files only
    ],
    # kernels/, benchmarks/ and configs/ stay top-level folders of the checkout; installed inside fastkd
    package_dir={"fastkd.kernels": "kernels", "fastkd.benchmarks": "benchmarks", "fastkd.configs": "configs"},
    package_data={"fastkd.configs": ["*.yaml"], "fastkd.configs.demo": ["*.yaml"]},
    include_package_data=True,
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext()},
    # minimums: the oldest versions tested (`make test-oldest`: Python 3.10, torch 2.11, triton 3.6,
    # timm 1.0.23, the oldest timm whose Attention layout, read by fastkd.models.vit_block, was checked).
    # torch 2.4 / triton 3.0 do not work: fastkd._C needs at::vec::fnmadd, and torch 2.4's custom_op
    # rejects the ops' string annotations.
    install_requires=[
        "torch>=2.11",
        "triton>=3.6; platform_system == 'Linux'",
        "torchvision",
        "timm>=1.0.23",
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "tensorboard",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130"],
        "xformers": ["xformers"],
        "dev": ["pytest", "scikit-image", "ninja", "cmake"],
    },
    entry_points={"console_scripts": ["fastkd=fastkd.cli:main"]},
)
