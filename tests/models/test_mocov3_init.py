"""MoCo v3's ViT init against the official ``VisionTransformerMoCo.__init__``, restated."""

import math

import pytest
import torch

from fastkd.models import build_backbone
from fastkd.models.mocov3_init import init_mocov3_vit


def test_bounds_and_zeros_follow_the_official_init():
    torch.manual_seed(0)
    backbone = build_backbone("vit_small_patch16_224", img_size=32, depth=2, num_heads=12)
    init_mocov3_vit(backbone)
    vit = backbone.model
    for name, module in vit.named_modules():
        if isinstance(module, torch.nn.Linear):
            out_f, in_f = module.weight.shape
            bound = math.sqrt(6.0 / ((out_f // 3 if "qkv" in name else out_f) + in_f))
            w = module.weight.abs()
            assert w.max() <= bound and w.max() > 0.99 * bound, name  # U(-a, a) with ~1e5 draws fills it
            assert torch.count_nonzero(module.bias) == 0, name
    proj = vit.patch_embed.proj.weight  # [384, 3, 16, 16]: official a = sqrt(6 / (3 * 16 * 16 + 384))
    bound = math.sqrt(6.0 / (3 * 16 * 16 + 384))
    assert proj.abs().max() <= bound and proj.abs().max() > 0.99 * bound
    assert proj.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    assert vit.cls_token.abs().max() < 1e-5 and vit.cls_token.abs().max() > 0


def test_mocov3_builds_its_vits_with_it_but_keeps_loaded_weights(tmp_path):
    from fastkd.methods import build_method
    from tests.methods.plain import TINY_MOCO, write_tiny_teacher

    method = build_method("mocov3", TINY_MOCO)
    proj = method.student.model.patch_embed.proj.weight
    fan = proj[0].numel() + proj.shape[0]
    assert proj.abs().max() <= math.sqrt(6.0 / fan) and proj.abs().max() > 0.9 * math.sqrt(6.0 / fan)
    path = write_tiny_teacher(tmp_path / "init.pt", seed=3)
    loaded = build_method("mocov3", {**TINY_MOCO, "backbone": {**TINY_MOCO["backbone"], "path": path}})
    reference = torch.load(path, weights_only=True)["state_dict"]["patch_embed.proj.weight"]
    torch.testing.assert_close(loaded.student.model.patch_embed.proj.weight, reference)
