"""fastkd.kernels.compile_configs."""

from fastkd.kernels import compile_configs


def test_every_kernel_module_registers_configurations():
    names = {config.name for config in compile_configs.all_compile_configs()}
    assert {"token_relation_fwd", "token_relation_bwd_dq", "token_relation_bwd_dk", "token_relation_row_lse",
            "gather_tokens_fwd", "gather_tokens_bwd", "feature_align_fwd"} <= names
