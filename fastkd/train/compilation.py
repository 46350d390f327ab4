"""``train.compile``: ``torch.compile`` of a method's whole forward, as ``torch.compile`` of a plain
PyTorch model does.

One graph holds every backbone pass (students, frozen and EMA teachers), the heads, the losses and
the glue, with fastkd's fused ops inside it as custom ops; ``fullgraph=True`` makes a graph break an
error, not a silent slowdown. The EMA / optimiser phase (``after_step``, the optimisers) stays
outside. Integer attributes of the method's modules (Hybrid Distill's kept-token count) are
unspecialised: the first value compiles a static graph, a second one a graph with that count
symbolic, and every later keep-ratio stage reuses it.

Each compiled method runs its own copy of its class's ``forward`` code: dynamo counts graphs per code
object under one recompile limit (8), so a process that builds several instances of one method (a
benchmark, a notebook) would otherwise hit it, a hard error under ``fullgraph=True``.
"""

from __future__ import annotations

import functools
import types

import torch
import torch._dynamo
from torch import nn


def compile_method(method: nn.Module, *, backend: str = "inductor") -> None:
    """Replace ``method.forward`` by ``torch.compile`` of it (``fullgraph=True``), in place."""
    shared = type(method).forward
    own = types.FunctionType(shared.__code__.replace(), shared.__globals__, shared.__name__, shared.__defaults__,
                             shared.__closure__)
    compiled = torch.compile(types.MethodType(own, method), fullgraph=True, backend=backend)

    @functools.wraps(shared)
    def forward(*args, **kwargs):
        with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True):
            return compiled(*args, **kwargs)

    method.forward = forward
