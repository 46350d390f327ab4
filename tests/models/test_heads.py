import pytest
import torch
import torch.nn.functional as F

from fastkd.models import (
    DINOHead,
    LinearProjector,
    MAEDecoder,
    MLPProjector,
    MoCoPredictor,
    MoCoProjector,
    THead,
    build_backbone,
    convert_sync_batchnorm,
    masked_pixel_loss,
    patchify,
)
from fastkd.ops import random_keep


def test_moco_projector_and_predictor_layout_and_shapes():
    projector = MoCoProjector(48, hidden_dim=64, out_dim=16, num_layers=3)
    predictor = MoCoPredictor(16, hidden_dim=32, out_dim=16)
    keys = set(projector.state_dict())
    assert {"mlp.0.weight", "mlp.1.weight", "mlp.6.weight", "mlp.7.running_mean"} <= keys
    assert "mlp.7.weight" not in keys and all(not k.endswith("bias") or ".1." in k or ".4." in k for k in keys)
    assert not projector.mlp[-1].affine and not predictor.mlp[-1].affine
    z = projector(torch.randn(5, 48))
    assert z.shape == (5, 16) and predictor(z).shape == (5, 16)
    torch.testing.assert_close(z.mean(0), torch.zeros(16), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="in_dim|48"):
        projector(torch.randn(5, 47))
    with pytest.raises(ValueError, match="num_layers"):
        MoCoProjector(48, num_layers=0)


def _layout(mlp):
    out = []
    for m in mlp:
        if isinstance(m, torch.nn.Linear):
            out.append(("Linear", m.in_features, m.out_features, m.bias is not None))
        elif isinstance(m, torch.nn.BatchNorm1d):
            out.append(("BatchNorm1d", m.num_features, m.affine))
        else:
            out.append((type(m).__name__,))
    return out


def test_moco_predictor_matches_the_published_layouts():
    """MoCo v3's moco/builder.py: ViT predictor ``_build_mlp(2, dim, mlp_dim, dim)`` (last_bn=True),
    ResNet predictor ``_build_mlp(2, dim, mlp_dim, dim, False)``."""
    vit = MoCoPredictor(256, 4096, 256)
    assert _layout(vit.mlp) == [("Linear", 256, 4096, False), ("BatchNorm1d", 4096, True), ("ReLU",),
                                ("Linear", 4096, 256, False), ("BatchNorm1d", 256, False)]
    resnet = MoCoPredictor(256, 4096, 256, last_bn=False)
    assert _layout(resnet.mlp) == _layout(vit.mlp)[:-1]
    # official key names (module.predictor.<i>...) load after stripping the prefix
    assert set(vit.mlp.state_dict()) == {"0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                                         "1.num_batches_tracked", "3.weight", "4.running_mean", "4.running_var",
                                         "4.num_batches_tracked"}
    with pytest.raises(TypeError, match="last_bn"):
        MoCoPredictor(16, 32, 16, last_bn=1)


def test_convert_sync_batchnorm():
    converted = convert_sync_batchnorm(MoCoProjector(8, hidden_dim=8, out_dim=4, num_layers=2))
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules()) == 2
    with pytest.raises(TypeError, match="module"):
        convert_sync_batchnorm("projector")


def test_dino_head_weight_norm_and_freezing():
    head = DINOHead(48, out_dim=100, hidden_dim=32, bottleneck_dim=16)
    x = torch.randn(4, 48)
    logits = head(x)
    assert logits.shape == (4, 100)
    z = F.normalize(head.mlp(x), dim=-1)
    v = head.last_layer.weight_v
    torch.testing.assert_close(logits, z @ (v / v.norm(dim=1, keepdim=True)).T)
    assert not head.last_layer.weight_g.requires_grad
    logits.square().sum().backward()
    assert head.last_layer.weight_g.grad is None and head.last_layer.weight_v.grad is not None
    head.cancel_last_layer_grad()
    assert head.last_layer.weight_v.grad is None and head.mlp[0].weight.grad is not None
    free = DINOHead(48, out_dim=100, hidden_dim=32, bottleneck_dim=16, norm_last_layer=False)
    free(x).sum().backward()
    assert free.last_layer.weight_g.grad is not None
    with pytest.raises(ValueError, match="DINOHead"):
        head(torch.randn(4, 47))


def test_thead_tokens_query_and_feature_map():
    head = THead(48, out_dim=50, dim=32, depth=2, num_heads=4)
    tokens = torch.randn(3, 7, 48)
    out = head(tokens)
    assert out.shape == (3, 50) and head.embed(tokens).shape == (3, 32)
    query = torch.randn(3, 32)
    with_query = head.embed(tokens, query)
    assert with_query.shape == (3, 32) and not torch.allclose(with_query, head.embed(tokens))
    torch.testing.assert_close(with_query, head.embed(tokens, query[:, None]))
    resnet_head = THead(64, out_dim=50, dim=32, depth=1, num_heads=4, input="feature_map")
    fmap = torch.randn(2, 64, 3, 3)
    assert resnet_head(fmap).shape == (2, 50)
    by_hand = resnet_head.adapter(fmap).flatten(2).transpose(1, 2)
    assert by_hand.shape == (2, 9, 32)
    with pytest.raises(ValueError, match="query"):
        head(tokens, torch.randn(3, 48))
    with pytest.raises(ValueError, match="feature_map"):
        resnet_head(tokens)
    with pytest.raises(ValueError, match="divisible"):
        THead(48, dim=30, num_heads=4)


def test_projectors():
    x = torch.randn(2, 5, 48)
    assert LinearProjector(48, 24)(x).shape == (2, 5, 24)
    assert MLPProjector(48, 24, hidden_dim=64)(x).shape == (2, 5, 24)
    with pytest.raises(ValueError, match="LinearProjector"):
        LinearProjector(48, 24)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="hidden_dim"):
        MLPProjector(48, 24, hidden_dim=0)


def test_patchify_order():
    images = torch.randn(2, 3, 8, 12)
    patches = patchify(images, 4)
    assert patches.shape == (2, 6, 48)
    torch.testing.assert_close(patches[1, 4], images[1, :, 4:8, 4:8].permute(1, 2, 0).reshape(-1))
    with pytest.raises(ValueError, match="divisible"):
        patchify(images, 5)


def test_masked_pixel_loss_matches_reference():
    images, keep = torch.randn(2, 3, 8, 8), torch.tensor([[0, 3], [2, 1]])
    pred = torch.randn(2, 4, 48)
    target = patchify(images, 4)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = (pred - target).square().mean(-1)
    want = (per_patch[0, 1] + per_patch[0, 2] + per_patch[1, 0] + per_patch[1, 3]) / 4
    torch.testing.assert_close(masked_pixel_loss(pred, images, keep, 4), want)
    raw = ((pred - patchify(images, 4)).square().mean(-1)[:, [1, 2]]).mean()
    keep_same = torch.tensor([[0, 3], [0, 3]])
    torch.testing.assert_close(masked_pixel_loss(pred, images, keep_same, 4, norm_pix=False), raw)
    with pytest.raises(ValueError, match="pred"):
        masked_pixel_loss(pred[:, :3], images, keep, 4)


def test_mae_decoder_places_visible_tokens_and_trains():
    backbone = build_backbone("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3)
    decoder = MAEDecoder.for_backbone(backbone, decoder_dim=32, depth=1, num_heads=4)
    images = torch.randn(2, 3, 32, 32)
    keep, _ = random_keep(2, 16, 4)
    tokens = backbone.forward_features(images, keep=keep).tokens
    pred = decoder(tokens, keep)
    assert pred.shape == (2, 16, 8 * 8 * 3)
    loss = masked_pixel_loss(pred, images, keep, backbone.patch_size)
    loss.backward()
    assert decoder.mask_token.grad is not None and backbone.model.patch_embed.proj.weight.grad is not None
    with torch.no_grad():  # the decoder input at a kept position comes from the encoder token, elsewhere mask_token
        h = decoder.embed(tokens)
        x0 = decoder.mask_token.expand(2, 16, 32).clone()
        for b in range(2):
            x0[b, keep[b]] = h[b, 1:]
        x = torch.cat([h[:, :1], x0], 1) + decoder.pos_embed
        for block in decoder.blocks:
            x = block(x)
        torch.testing.assert_close(decoder.pred(decoder.norm(x))[:, 1:], pred, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="keep"):
        decoder(tokens, keep[:, :3])


def _thead_by_hand(head, x, query=None, grid=None):
    """The official MOKD T-head written out: adapter, + the (bicubically resized) positional
    embedding, [query], timm's own block forward, LayerNorm eps 1e-6, mean, weight-normed last
    layer on the un-normalised mean."""
    if head.input == "feature_map":
        t = F.conv2d(x, head.adapter.weight, head.adapter.bias).flatten(2).transpose(1, 2)
        h, w = x.shape[2:]
    else:
        t = F.linear(x, head.adapter.weight, head.adapter.bias)
        h, w = grid
    gh, gw = head.pos_grid
    pos = head.pos_embed.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
    if (h, w) != (gh, gw):
        pos = F.interpolate(pos, scale_factor=((h + 0.1) / gh, (w + 0.1) / gw), mode="bicubic")
    t = t + pos.flatten(2).transpose(1, 2)
    if query is not None:
        t = torch.cat([query[:, None], t], dim=1)
    for block in head.blocks:
        t = block(t)
    t = F.layer_norm(t, (head.dim,), head.norm.weight, head.norm.bias, eps=1e-6)
    e = (t[:, 1:] if query is not None else t).mean(dim=1)
    v, g = head.last_layer.weight_v, head.last_layer.weight_g
    return e @ (g * v / v.norm(dim=1, keepdim=True)).T


def test_thead_positional_embedding_and_trainable_gain():
    torch.manual_seed(0)
    head = THead(24, out_dim=20, dim=16, depth=2, num_heads=2, input="feature_map", pos_grid=4)
    assert head.pos_embed.shape == (1, 16, 16) and head.pos_embed.requires_grad
    assert head.last_layer.weight_g.requires_grad
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)  # a trained gain, so the reference must apply it
    query = torch.randn(2, 16)
    for size in (4, 2, 3):  # the head's own grid, and the smaller maps of local crops (resized)
        fmap = torch.randn(2, 24, size, size)
        out = head(fmap)
        torch.testing.assert_close(out, _thead_by_hand(head, fmap), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(head(fmap, query), _thead_by_hand(head, fmap, query), rtol=1e-4, atol=1e-5)
    # the embedding goes to the last layer as it is (no l2 normalisation): the logits scale with it
    e = head.embed(fmap)
    torch.testing.assert_close(head.logits(3 * e), 3 * head.logits(e))
    # the positional embedding makes the head see token order; pos_embed and gain get gradients
    perm = torch.randperm(9)
    shuffled = fmap.flatten(2)[:, :, perm].reshape(fmap.shape)
    assert not torch.allclose(head(shuffled), head(fmap), atol=1e-4)
    head(fmap).square().sum().backward()
    assert head.pos_embed.grad is not None and head.last_layer.weight_g.grad is not None
    # without a positional embedding and with a frozen gain: order-blind
    plain = THead(24, out_dim=20, dim=16, depth=1, num_heads=2, input="feature_map", norm_last_layer=True)
    assert plain.pos_embed is None and not plain.last_layer.weight_g.requires_grad
    torch.testing.assert_close(plain(shuffled), plain(fmap), rtol=1e-4, atol=1e-5)


def test_thead_tokens_grid_project_and_input_mean():
    torch.manual_seed(0)
    head = THead(24, out_dim=20, dim=16, depth=1, num_heads=2, pos_grid=(4, 4))
    tokens = torch.randn(2, 6, 24)  # a 2 x 3 grid: not square, so the grid must be given
    out = head(tokens, grid=(2, 3))
    torch.testing.assert_close(out, _thead_by_hand(head, tokens, grid=(2, 3)), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="grid"):
        head(tokens)
    with pytest.raises(ValueError, match="grid"):
        head(tokens, grid=(2, 2))
    square = torch.randn(2, 9, 24)  # inferred 3 x 3
    torch.testing.assert_close(head(square), _thead_by_hand(head, square, grid=(3, 3)), rtol=1e-4, atol=1e-5)
    # input mean: the adapter output averaged over tokens, before positional embedding and blocks
    _, mean = head.embed(square, return_input_mean=True)
    torch.testing.assert_close(mean, head.adapter(square).mean(1))
    torch.testing.assert_close(head.project(square[:, 0]), head.adapter(square[:, 0]))
    conv = THead(24, out_dim=20, dim=16, depth=1, num_heads=2, input="feature_map", pos_grid=3)
    fmap = torch.randn(2, 24, 3, 3)
    _, mean = conv.embed(fmap, return_input_mean=True)
    torch.testing.assert_close(mean, conv.adapter(fmap).mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(conv.project(fmap.mean(dim=(2, 3))), mean, rtol=1e-5, atol=1e-6)


def test_mae_decoder_layer_norms_use_the_official_eps():
    """Every LayerNorm of the decoder (each block's two and the final one) has eps 1e-6, as MAE's decoder."""
    decoder = MAEDecoder(encoder_dim=32, grid_size=(2, 2), patch_size=4, decoder_dim=16, depth=2, num_heads=2)
    norms = [m for m in decoder.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * 2 + 1
    assert all(m.eps == 1e-6 for m in norms)
