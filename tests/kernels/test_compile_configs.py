"""fastkd.kernels.compile_configs (formerly fastkd.kernels.registry, now its deprecated alias)."""

import importlib

import pytest

from fastkd.kernels import compile_configs


def test_every_kernel_module_registers_configurations():
    names = {config.name for config in compile_configs.all_compile_configs()}
    assert {"token_relation_fwd", "token_relation_bwd_dq", "token_relation_bwd_dk", "token_relation_row_lse",
            "gather_tokens_fwd", "gather_tokens_bwd", "feature_align_fwd"} <= names


def test_registry_is_a_deprecated_alias():
    registry = importlib.import_module("fastkd.kernels.registry")
    for name in ("CompileConfig", "register_compile_config", "all_compile_configs"):
        with pytest.warns(DeprecationWarning, match="fastkd.kernels.compile_configs"):
            assert getattr(registry, name) is getattr(compile_configs, name)
