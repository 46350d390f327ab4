"""Which dtype each part of a step computes in: the training autocast and the frozen teachers.

``train.precision`` is the autocast dtype of the whole step (students, heads, losses, EMA
teachers). ``train.teacher_precision`` is the compute dtype of *frozen* pretrained teachers
(MOMA's and Hybrid Distill's): their weights never change and their outputs are only loss targets,
so they can run in bf16 where the hardware computes bf16 natively while the student trains in fp32.
``auto`` picks bf16 where it is native (a CUDA GPU with bf16, or a CPU with AVX512-BF16 or AMX
instructions: there a bf16 ViT-S/16 forward took 0.95 s against 1.97 s in fp32 at batch 32,
224 px, on the 2-core AMD EPYC development machine) and the training precision elsewhere (a CPU
without them emulates bf16, which is slower than fp32).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
TEACHER_PRECISIONS = ("auto", "same", *PRECISIONS)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# /proc/cpuinfo flags of CPUs that compute bf16 natively (dot products / tile matmuls)
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=None)
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The first processor's feature flags in ``cpuinfo`` (empty where the file does not exist)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU that supports it, a CPU with one of
    :data:`NATIVE_BF16_CPU_FLAGS`."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu" and any(flag in cpu_flags() for flag in NATIVE_BF16_CPU_FLAGS)


def teacher_precision_for(teacher_precision: str, precision: str, device: torch.device | str) -> str:
    """The precision frozen teachers compute in: ``auto`` = ``bf16`` where :func:`native_bf16`,
    else the training ``precision``; ``same`` = the training precision; else as given."""
    if teacher_precision not in TEACHER_PRECISIONS:
        raise ValueError(f"train.teacher_precision must be one of {TEACHER_PRECISIONS}, got {teacher_precision!r}")
    if teacher_precision == "auto":
        return "bf16" if native_bf16(device) else precision
    return precision if teacher_precision == "same" else teacher_precision


def autocast(precision: str, device: torch.device | str):
    """``torch.autocast`` to ``precision`` on ``device``'s type (a null context for fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[precision])
