import pytest
import torch

from fastkd.models import Backbone, Features, build_backbone
from fastkd.ops import random_keep, topk_keep

TINY = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3)
NAME = "vit_tiny_patch16_224"


def tiny(attention=None, **overrides):
    torch.manual_seed(0)
    return build_backbone(NAME, attention=attention, **{**TINY, **overrides})


def images(batch=2, size=32):
    return torch.randn(batch, 3, size, size)


def _param_grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


def test_unmasked_forward_equals_timm_and_global_feature_is_cls():
    backbone, x = tiny(), images()
    features = backbone.forward_features(x)
    assert isinstance(features, Features)
    assert features.tokens.shape == (2, 17, 48)
    torch.testing.assert_close(features.tokens, backbone.model.forward_features(x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(backbone(x), features.tokens[:, 0])
    assert (backbone.embed_dim, backbone.num_heads, backbone.depth) == (48, 3, 3)
    assert (backbone.patch_size, backbone.num_patches, backbone.num_prefix_tokens, backbone.is_vit) == (8, 16, 1, True)


def _assert_grads_close(got, want, rel):
    """max |got - want| <= rel * max |want| per tensor (gradients summed over many tokens)."""
    for g, w in zip(got, want):
        g, w = g.double(), w.double()
        assert (g - w).abs().max() <= rel * w.abs().max(), ((g - w).abs().max(), w.abs().max())


@pytest.mark.parametrize("dtype,tol,grad_rel", [(torch.float32, 1e-5, 1e-5), (torch.bfloat16, 3e-2, 6e-2)])
def test_sdpa_and_math_backbones_agree_forward_and_backward(dtype, tol, grad_rel):
    sdpa, math = tiny("sdpa").to(dtype), tiny("math").to(dtype)
    math.load_state_dict(sdpa.state_dict())
    x = images().to(dtype)
    out_s, out_m = sdpa.forward_features(x).tokens, math.forward_features(x).tokens
    torch.testing.assert_close(out_s, out_m, atol=tol, rtol=tol)
    grad = torch.randn_like(out_s)
    _assert_grads_close(_param_grads(sdpa, (out_s * grad).sum()), _param_grads(math, (out_m * grad).sum()), grad_rel)


def test_returned_qk_reproduce_the_block_attention():
    backbone = tiny(qk_norm=True)
    x = images()
    features = backbone.forward_features(x, return_qk=[1, -1], return_layers=[0, 1])
    assert sorted(features.qk) == [1, 2] and sorted(features.layers) == [0, 1]
    q, k = features.qk[1]
    assert q.shape == k.shape == (2, 3, 17, 16)
    block, h = backbone.model.blocks[1], features.layers[0]
    hn = block.norm1(h)
    v = block.attn.qkv(hn).reshape(2, 17, 3, 3, 16)[:, :, 2].transpose(1, 2)
    attn = torch.softmax(q @ k.transpose(-2, -1) * block.attn.scale, dim=-1) @ v
    a = block.attn.proj(attn.transpose(1, 2).reshape(2, 17, 48))
    h = h + a
    h = h + block.mlp(block.norm2(h))
    torch.testing.assert_close(h, features.layers[1], atol=1e-5, rtol=1e-5)


def test_keep_all_equals_unmasked_forward():
    backbone, x = tiny(), images()
    keep = torch.arange(16).expand(2, 16).contiguous()
    torch.testing.assert_close(backbone.forward_features(x, keep=keep).tokens, backbone.forward_features(x).tokens)


@pytest.mark.parametrize("overrides", [{}, dict(no_embed_class=True, reg_tokens=2)])
def test_masked_forward_equals_gather_by_hand(overrides):
    # sdpa, as timm's blocks of the by-hand path (an ``auto`` measured as math rounds otherwise: ~4e-5)
    backbone, x = tiny(attention="sdpa", **overrides), images(3)
    model, P = backbone.model, backbone.num_prefix_tokens
    keep, _ = random_keep(3, 16, 5)
    masked = backbone.forward_features(x, keep=keep, return_qk=[0])
    patches = model.patch_embed(x)
    pos_patch = model.pos_embed if model.no_embed_class else model.pos_embed[:, P:]
    prefix = torch.cat([model.cls_token] + ([model.reg_token] if model.reg_token is not None else []), 1)
    if not model.no_embed_class:
        prefix = prefix + model.pos_embed[:, :P]
    visible = torch.gather(patches + pos_patch, 1, keep[..., None].expand(-1, -1, 48))
    by_hand = model.norm(model.blocks(torch.cat([prefix.expand(3, -1, -1), visible], 1)))
    assert masked.tokens.shape == (3, P + 5, 48) and masked.qk[0][0].shape == (3, 3, P + 5, 16)
    torch.testing.assert_close(masked.tokens, by_hand, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(by_hand)
    for a, b in zip(_param_grads(backbone, (masked.tokens * grad).sum()), _param_grads(backbone, (by_hand * grad).sum())):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_topk_keep_and_single_visible_token():
    backbone, x = tiny(), images()
    keep = topk_keep(torch.randn(2, 16), 1)
    assert backbone.forward_features(x, keep=keep).tokens.shape == (2, 2, 48)


def test_activation_checkpointing_matches():
    plain, ckpt = tiny(), tiny(checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    x = images()
    keep, _ = random_keep(2, 16, 7)
    a = plain.forward_features(x, keep=keep, return_qk=[1])
    b = ckpt.forward_features(x, keep=keep, return_qk=[1])
    loss_a = a.tokens.square().sum() + a.qk[1][0].sum()
    loss_b = b.tokens.square().sum() + b.qk[1][0].sum()
    torch.testing.assert_close(loss_a, loss_b)
    for ga, gb in zip(_param_grads(plain, loss_a), _param_grads(ckpt, loss_b)):
        torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-5)


def test_dynamic_img_size_resamples_pos_embed():
    backbone = tiny(dynamic_img_size=True)
    x = images(size=48)
    torch.testing.assert_close(backbone.forward_features(x).tokens, backbone.model.forward_features(x),
                               atol=1e-6, rtol=1e-6)


@pytest.mark.filterwarnings("ignore:attention backend 'auto'")
@pytest.mark.parametrize("backend", ["sdpa", "math", "auto"])
def test_tiny_vit_forward_backward_per_backend(backend):
    backbone = tiny(backend)
    out = backbone(images())
    out.sum().backward()
    assert out.shape == (2, 48) and backbone.model.patch_embed.proj.weight.grad is not None


def test_xformers_backend_on_cpu_raises_at_forward():
    with pytest.raises(RuntimeError, match="xformers"):
        tiny("xformers")(images())


def test_resnet_backbone_returns_pooled_and_map():
    backbone = build_backbone("resnet18", layers=(1, 1, 1, 1))
    x = images(2, 64)
    features = backbone.forward_features(x)
    assert features.feature_map.shape == (2, 512, 2, 2) and features.tokens is None
    torch.testing.assert_close(backbone(x), features.feature_map.mean((2, 3)))
    assert not backbone.is_vit and backbone.embed_dim == 512
    with pytest.raises(ValueError, match="ResNet"):
        backbone.forward_features(x, keep=torch.zeros(2, 1, dtype=torch.long))


def test_compiles_fullgraph():
    backbone, x = tiny(), images()
    keep, _ = random_keep(2, 16, 4)

    def run(x, keep):
        f = backbone.forward_features(x, keep=keep, return_qk=[2])
        return f.tokens, f.qk[2][0]

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(x, keep), run(x, keep)):
        torch.testing.assert_close(got, want)


def test_validation_errors():
    backbone, x = tiny(), images()
    with pytest.raises(ValueError, match="keep"):
        backbone.forward_features(x, keep=torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="keep"):
        backbone.forward_features(x, keep=torch.zeros(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="return_qk"):
        backbone.forward_features(x, return_qk=[3])
    with pytest.raises(TypeError, match="return_layers"):
        backbone.forward_features(x, return_layers=1)
    with pytest.raises(ValueError, match="x must be"):
        backbone.forward_features(x[0])
    with pytest.raises(ValueError, match="pretrained"):
        build_backbone(NAME, pretrained=True)
    with pytest.raises(ValueError, match="num_classes"):
        build_backbone(NAME, num_classes=10, **TINY)
    with pytest.raises(ValueError, match="unknown timm model"):
        build_backbone("no_such_model")
    with pytest.raises(TypeError, match="VisionTransformer or ResNet"):
        Backbone(torch.nn.Linear(2, 2), "linear")
    with pytest.raises(ValueError, match="attention backend"):
        tiny("flash")
    with pytest.raises(TypeError, match="token embedding"):
        build_backbone("deit_tiny_distilled_patch16_224", **{**TINY, "depth": 1})


def test_masked_forward_under_bf16_autocast():
    backbone, x = tiny(), images()
    keep, _ = random_keep(2, 16, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = backbone.forward_features(x, keep=keep, return_qk=[0])
        loss = features.tokens.float().square().mean()
    loss.backward()
    assert features.qk[0][0].dtype == torch.bfloat16 and backbone.model.pos_embed.grad is not None
    torch.testing.assert_close(features.tokens.float(), backbone.forward_features(x, keep=keep).tokens,
                               atol=0.1, rtol=0.05)
