"""Which dtype each part of a step computes in: the training autocast and the frozen teachers.

``train.precision`` is the autocast dtype of the whole step. ``train.teacher_precision`` is the
compute dtype of *frozen* pretrained teachers (MOMA's, Hybrid Distill's), whose outputs are only loss
targets. ``auto``: on CUDA bf16 (fp16 without bf16 support); on CPU the step's precision when it is
not fp32, else bf16 or fp32, whichever ran a ViT-S-sized linear layer (``TEACHER_LINEAR``, no
gradient) faster on this machine, measured once and cached (:mod:`fastkd.measured_choice`): CPUs
with AVX512-BF16 / AMX win with bf16, others emulate it and lose.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from fastkd import measured_choice
from fastkd.checks import check_choice

PRECISIONS = ("fp32", "bf16", "fp16")
TEACHER_PRECISIONS = ("auto", "same", *PRECISIONS)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TEACHER_LINEAR = (256, 384, 1536)  # tokens x in -> out features of the linear layer that CPU "auto" times


def _teacher_linear_candidates(device: torch.device) -> dict:
    tokens, width, out = TEACHER_LINEAR
    x = torch.linspace(-1, 1, tokens * width, device=device).reshape(tokens, width)  # no global RNG
    w = torch.linspace(-0.05, 0.05, out * width, device=device).reshape(out, width)

    def run(dtype):
        xs, ws = x.to(dtype), w.to(dtype)
        return lambda: F.gelu(F.linear(xs, ws))

    return {name: run(DTYPES[name]) for name in ("fp32", "bf16")}


def teacher_precision_for(teacher_precision: str, precision: str, device: torch.device | str) -> str:
    """The precision frozen teachers compute in: ``auto`` as the module doc says; ``same`` = the
    training ``precision``; else as given."""
    check_choice("train.teacher_precision", teacher_precision, TEACHER_PRECISIONS)
    if teacher_precision != "auto":
        return precision if teacher_precision == "same" else teacher_precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision != "fp32":
        return precision
    return measured_choice.choose("teacher_precision", f"linear {'x'.join(map(str, TEACHER_LINEAR))} no-grad",
                                  device, ("fp32", "bf16"), lambda: _teacher_linear_candidates(device))


def autocast(precision: str, device: torch.device | str):
    """``torch.autocast`` to ``precision`` on ``device``'s type (a null context for fp32)."""
    check_choice("precision", precision, PRECISIONS)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[precision])
