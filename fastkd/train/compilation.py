"""``train.compile``: ``torch.compile`` every backbone pass a method runs.

Methods call ``Backbone.forward_features`` (with ``keep`` / ``return_qk`` / ``return_layers``), not
``forward``, and run several backbones (student, frozen teachers, EMA teachers): each of them is
compiled in place with ``fullgraph=True`` (the fused ops are custom ops inside the graph, so a graph
break is an error, not a silent slowdown). The kept-token count is dynamic (see
:meth:`fastkd.models.Backbone.compile`), so a keep-ratio schedule does not recompile every stage.
"""

from __future__ import annotations

from torch import nn

from fastkd.models import Backbone


def compile_backbones(method: nn.Module, *, backend: str = "inductor") -> list[Backbone]:
    """Compile every :class:`~fastkd.models.Backbone` inside ``method``; returns them."""
    backbones = [module for module in method.modules() if isinstance(module, Backbone)]
    for backbone in backbones:
        backbone.compile(backend=backend, fullgraph=True)
    return backbones
