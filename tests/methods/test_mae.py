import pytest
import torch

from fastkd.methods import MAE, MAEConfig, build_method
from tests.methods.common import check_gradients, check_parts_and_total, steps_lower_loss
from tests.methods.plain import TINY_VIT, TINY_VIT_ARCH, tiny_batch

CONFIG = dict(backbone=dict(arch=TINY_VIT_ARCH, kwargs=TINY_VIT), decoder_dim=32, decoder_depth=1, decoder_num_heads=2)


def _plain_mae(method, x, seed):
    """MAE written out: argsort-of-noise masking, timm blocks, scatter-unshuffle, plain MSE."""
    b, d = method.backbone, method.decoder
    m, p = b.model, b.patch_size
    B, N, K = x.shape[0], b.num_patches, method.num_visible
    torch.manual_seed(seed)
    keep = torch.argsort(torch.rand(B, N), dim=1)[:, :K]
    patches = m.patch_embed(x) + m.pos_embed[:, 1:]
    visible = torch.stack([patches[i, keep[i]] for i in range(B)])
    h = torch.cat([m.cls_token.expand(B, -1, -1) + m.pos_embed[:, :1], visible], dim=1)
    for block in m.blocks:
        h = block(h)
    h = d.embed(m.norm(h))
    full = d.mask_token.expand(B, N, -1).clone()
    for i in range(B):
        full[i, keep[i]] = h[i, 1:]
    z = torch.cat([h[:, :1], full], dim=1) + d.pos_embed
    for block in d.blocks:
        z = block(z)
    pred = d.pred(d.norm(z))[:, 1:]
    target = x.reshape(B, 3, 4, p, 4, p).permute(0, 2, 4, 3, 5, 1).reshape(B, N, -1)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    masked = torch.ones(B, N)
    masked[torch.arange(B)[:, None], keep] = 0
    return (((pred - target) ** 2).mean(-1) * masked).sum() / masked.sum()


def test_parts_total_gradients_and_reference():
    method = build_method("mae", CONFIG)
    assert method.recipe == "mae" and method.student is method.backbone
    assert method.num_visible == 4  # round(0.25 * 16)
    batch = tiny_batch()
    torch.manual_seed(5)
    out = method(batch)
    check_parts_and_total(out, {"reconstruction": 1.0}, ("visible_tokens",))
    assert out["visible_tokens"].item() == 4
    torch.testing.assert_close(out["loss"], _plain_mae(method, batch.views[0], 5), rtol=1e-5, atol=1e-5)
    check_gradients(method, out, frozen=[])


def test_steps_lower_loss():
    method = build_method("mae", CONFIG)
    first, last = steps_lower_loss(method, tiny_batch(), lr=3e-3)
    assert last < first


def test_mask_ratio_switch():
    assert build_method("mae", {**CONFIG, "mask_ratio": 0.5}).num_visible == 8


def test_bad_config_and_batch():
    with pytest.raises(ValueError, match="mask_ratio"):
        MAEConfig(mask_ratio=0.0)
    with pytest.raises(ValueError, match="did you mean 'mask_ratio'"):
        build_method("mae", {**CONFIG, "mask_ration": 0.5})
    with pytest.raises(TypeError, match="Batch"):
        build_method("mae", CONFIG)([torch.randn(2, 3, 32, 32)])
    with pytest.raises(TypeError, match="MAEConfig"):
        MAE({"backbone": {"arch": TINY_VIT_ARCH}})
