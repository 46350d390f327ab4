"""Compile configurations of the Triton kernels, for the ahead-of-time compile check.

Every kernel file registers the configurations it would launch with at ViT-S/B/L shapes by
calling :func:`register_compile_config` at import time; :func:`all_compile_configs` imports every
kernel module of ``fastkd.kernels`` and returns them all. The compile check compiles each one for
sm_80 and sm_90 with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` and fails
on any register spill.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CompileConfig:
    """One launch configuration of one kernel.

    ``signature`` maps every non-constexpr argument name to its Triton type string
    (``"*fp32"``, ``"*bf16"``, ``"i32"``, ``"fp32"`` ...); ``constexprs`` maps every
    ``tl.constexpr`` argument name to its value.
    """

    name: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
    label: str = ""


_CONFIGS: list[CompileConfig] = []


def register_compile_config(name: str, kernel: Any, signature: dict[str, str], constexprs: dict[str, Any] | None = None,
                            *, num_warps: int = 4, num_stages: int = 2, label: str = "") -> None:
    """Add one configuration of ``kernel`` to the compile check."""
    _CONFIGS.append(CompileConfig(name, kernel, dict(signature), dict(constexprs or {}), num_warps, num_stages, label))


def all_compile_configs() -> list[CompileConfig]:
    """Import every kernel module (so it registers itself) and return all configurations."""
    import fastkd.kernels.feature_align  # noqa: F401
    import fastkd.kernels.gather_tokens  # noqa: F401
    import fastkd.kernels.token_relation  # noqa: F401

    return list(_CONFIGS)
