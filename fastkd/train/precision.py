"""Which dtype each part of a step computes in: the training autocast and the frozen teachers.

``train.precision`` is the autocast dtype of the whole step (students, heads, losses, EMA
teachers). ``train.teacher_precision`` is the compute dtype of *frozen* pretrained teachers
(MOMA's and Hybrid Distill's): their weights never change and their outputs are only loss targets,
so they can run in a faster dtype while the student trains in fp32. ``auto`` picks, on CUDA, bf16
(fp16 on a GPU without bf16): half precision beats fp32 on every CUDA GPU; on CPU with a bf16 step,
bf16; on CPU with an fp32 step, bf16 or fp32, whichever ran a ViT-S-sized linear layer
(``TEACHER_LINEAR``, no gradient) faster, measured on the running machine the first time and
cached in the user cache directory
(:mod:`fastkd.measured_choice`): a CPU with AVX512-BF16 / AMX computes bf16 natively and wins with
it (a bf16 ViT-S/16 forward took 0.95 s against 1.97 s in fp32 at batch 32, 224 px, on a 2-core
AMD EPYC), one without emulates bf16, which is slower than fp32.
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
