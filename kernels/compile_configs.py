"""Launch configurations (at ViT-S/B/L shapes) each kernel module registers at import, for the ahead-of-time
compile check, which compiles each for sm_80 and sm_90 and fails on any register spill."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CompileConfig:
    """``signature``: non-constexpr argument -> Triton type (``"*fp32"``, ``"i32"``, ...); ``constexprs``: values."""

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
