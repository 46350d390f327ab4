"""Linear layers whose fp32 CPU GEMMs run in the library this machine measures faster: torch's BLAS
(MKL in the x86 wheels) or oneDNN.

:class:`MeasuredLinear` is an ``nn.Linear`` (same parameters, state dict and init) computing the same
products in fp32 with either library::

    y = x W^T + b        dx = dy W        dW = dy^T x        db = sum_rows dy

``"onednn"`` runs ``y`` and ``dx`` through ``torch.ops.mkldnn._linear_pointwise`` (oneDNN's fp32
inner product, the transposed weight read as a strided view, no copy) and ``dW`` / ``db`` through
torch's ``mm`` / ``sum`` as ``nn.Linear`` does; ``"blas"`` is ``F.linear``. On AMD CPUs MKL's fp32
GEMMs can trail oneDNN's by 1.1-2x (the batch-16 projector layers most); on an Intel CPU they are
about even. So the choice is measured where it runs (:mod:`fastkd.measured_choice`, name
``linear``): the first fp32 CPU call of a class (grad or no-grad, few rows (<= :data:`FEW_ROWS`,
weight-bound) or many) times a forward (+ backward in grad mode) of both at a shape of its class and
keeps the faster, per machine and torch version. Other devices and dtypes (bf16 / fp16 already run in
oneDNN on CPU; CUDA in cuBLAS), a torch without oneDNN, calls inside ``fastkd.ops.reference_ops()``
(plain PyTorch) and ``FASTKD_LINEAR=blas`` run ``F.linear``;
``FASTKD_LINEAR=onednn`` forces oneDNN where it can run. :func:`adopt_measured_linear` turns every
``nn.Linear`` of a module into one (a class swap: parameters, hooks and ``isinstance`` stay).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from fastkd import measured_choice
from fastkd.checks import check_choice
from fastkd.ops import reference_ops_enabled

BACKENDS = ("blas", "onednn")
FEW_ROWS = 64
# (rows, in, out) timed per class: a ViT-S/16 MLP layer on ~2 images; a 2048-wide head layer on 16 rows
MEASURED_SHAPES = {"many": (512, 384, 1536), "few": (16, 2048, 2048)}


def _onednn_forward(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x2, weight, bias, "none", [], "")


@torch.library.custom_op("fastkd::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (fp32, CPU) by oneDNN's inner product."""
    x2 = x.reshape(-1, x.shape[-1])
    return _onednn_forward(x2, weight, bias).reshape(*x.shape[:-1], weight.shape[0])


@onednn_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    dy = grad.reshape(-1, grad.shape[-1])
    dx = dw = db = None
    if ctx.needs_input_grad[0]:
        dx = onednn_linear(dy, weight.t(), None).reshape(x.shape)  # dy W: W^T's rows are W's columns
    if ctx.needs_input_grad[1]:
        dw = dy.t().mm(x.reshape(-1, x.shape[-1]))
    if ctx.has_bias and ctx.needs_input_grad[2]:
        db = dy.sum(0)
    return dx, dw, db


onednn_linear.register_autograd(_backward, setup_context=_setup)


def onednn_available() -> bool:
    """torch built with oneDNN and exposing its inner-product op (torch-internal: guarded, not assumed)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _row_class(rows: int) -> str:
    return "few" if rows <= FEW_ROWS else "many"


@torch._dynamo.assume_constant_result
def measured_backend(grad: bool, row_class: str) -> str:
    """The faster of :data:`BACKENDS` for fp32 CPU linears of ``row_class``, measured once per machine
    (``FASTKD_LINEAR`` when set; ``"blas"`` without oneDNN)."""

    def candidates():
        rows, fan_in, fan_out = MEASURED_SHAPES[row_class]
        x = torch.linspace(-1, 1, rows * fan_in).reshape(rows, fan_in).requires_grad_(grad)  # the RNG stays put
        w = torch.linspace(-0.05, 0.05, fan_out * fan_in).reshape(fan_out, fan_in).requires_grad_(grad)
        b = torch.zeros(fan_out, requires_grad=grad)

        def run(backend):
            with torch.set_grad_enabled(grad):
                y = onednn_linear(x, w, b) if backend == "onednn" else F.linear(x, w, b)
                if grad:
                    torch.autograd.grad(y.sum(), (x, w, b))

        return {name: (lambda name=name: run(name)) for name in BACKENDS}

    setting = os.environ.get("FASTKD_LINEAR", "auto")
    check_choice("FASTKD_LINEAR", setting, ("auto",) + BACKENDS)
    if setting != "auto" or not onednn_available():
        return setting if onednn_available() else "blas"
    mode = "train" if grad else "no-grad"
    return measured_choice.choose("linear", f"float32 {mode} {row_class} rows", "cpu", BACKENDS, candidates)


def backend_for(x: torch.Tensor, weight: torch.Tensor) -> str:
    """``"onednn"`` or ``"blas"`` for this call (module doc)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or x.dim() < 1:
        return "blas"
    if torch.is_autocast_enabled("cpu") or reference_ops_enabled():
        return "blas"
    rows = x.numel() // max(x.shape[-1], 1)
    return measured_backend(torch.is_grad_enabled(), _row_class(rows))


class MeasuredLinear(nn.Linear):
    """``nn.Linear`` whose fp32 CPU products run in the measured library (module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if backend_for(x, self.weight) == "onednn":
            return onednn_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def adopt_measured_linear(module: nn.Module) -> nn.Module:
    """Every plain ``nn.Linear`` of ``module`` (itself included) becomes a :class:`MeasuredLinear`, in place."""
    for child in module.modules():
        if type(child) is nn.Linear:
            child.__class__ = MeasuredLinear
    return module
