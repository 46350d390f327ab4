"""First-step losses and gradients of MoCo v3 and MOKD against the official code's formulas,
restated here as plain PyTorch over the same weights (no fastkd forward path: explicit attention,
DINO's position-embedding interpolation, the official heads and losses).

Restated from the official code:
- MoCo v3 (``moco/builder.py``): ``q_v = predictor(base_encoder(x_v))``, ``k_v = momentum_encoder(x_v)``
  (a copy of the base encoder at step 0), ``loss = ctr(q_1, k_2) + ctr(q_2, k_1)`` with
  ``ctr(q, k) = CE(normalize(q) normalize(k)^T / T, arange(N)) * 2T``; heads from ``_build_mlp``:
  ``Linear(bias=False)`` + ``BatchNorm1d`` + ``ReLU`` between layers, ``BatchNorm1d(affine=False)``
  after the last one where ``last_bn``. ViT: 3-layer projector, predictor with its last BN, the CLS
  token; ResNet: 2-layer projector, predictor without the last BN, the pooled last stage.
- MOKD (``main_mokd.py`` + ``models/mokd.py`` + ``backbones/vision_transformer.py``): DINO heads
  ``last_layer(normalize(mlp(x)))`` (weight-norm); T-heads ``THead_ViT`` / ``THead_CNN``: (1x1 conv for
  the CNN, whose average pool is the CNN's search query) + DINO-interpolated positional embedding
  (+ a prepended query token) -> blocks -> norm -> mean (query excluded) -> weight-norm last layer;
  ``DINOLoss`` at epoch 0 (centre 0, teacher temperature 0.04) over (teacher global view i, student
  crop v != i); ``CTSearchLoss``: CE(softmax(t / 0.04), log_softmax(s / 0.1)) of each model's student
  T-head on the local crops against the other model's teacher T-head over its global view 0 patches
  queried by the first model's (detached) local-crop query; ``total_X = self_mlp + self_thead +
  lambda_X (cross_mlp + cross_search)``.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastkd.data.batch import Batch
from fastkd.methods import build_method
from tests.methods.common import assert_close_relative
from tests.methods.plain import dino_interpolate_pos_encoding, plain_block, plain_vit

T0 = 0.04  # the teacher temperature at epoch 0 (warmup_teacher_temp)
STUDENT_TEMP = 0.1


pytestmark = pytest.mark.usefixtures("float64")  # tests/methods/conftest.py


def compare_gradients(method, fastkd_loss: torch.Tensor, official_loss: torch.Tensor, rtol: float = 1e-5) -> None:
    """Every trainable parameter's gradient to ``rtol``; a gradient the official formula makes zero
    (below 1e-9 of the largest, e.g. a bias whose shift a BatchNorm removes) must be zero too."""
    named = [(n, p) for n, p in method.named_parameters() if p.requires_grad]
    fastkd = torch.autograd.grad(fastkd_loss, [p for _, p in named], allow_unused=True)
    official = torch.autograd.grad(official_loss, [p for _, p in named], allow_unused=True)
    zero = lambda g, like: torch.zeros_like(like) if g is None else g  # noqa: E731
    scale = max(zero(ref, p).norm() for (_, p), ref in zip(named, official))
    compared = 0
    for (name, p), g, ref in zip(named, fastkd, official):
        g, ref = zero(g, p), zero(ref, p)
        if ref.norm() <= 1e-9 * scale:
            assert g.norm() <= 1e-9 * scale, f"{name}: gradient where the official formula has none"
            continue
        assert_close_relative(g, ref, f"grad {name}", rtol)
        compared += 1
    assert compared > 10


# ---- MoCo v3 ------------------------------------------------------------------------------------

def official_mlp(num_layers: int, input_dim: int, mlp_dim: int, output_dim: int, last_bn: bool = True) -> nn.Sequential:
    """``MoCo._build_mlp`` of the official builder, restated: ``Linear(bias=False)`` layers with
    ``BatchNorm1d + ReLU`` between them and ``BatchNorm1d(affine=False)`` after the last (``last_bn``)."""
    widths = [input_dim] + [mlp_dim] * (num_layers - 1) + [output_dim]
    layers = []
    for index, (dim1, dim2) in enumerate(zip(widths, widths[1:])):
        last = index == num_layers - 1
        layers.append(nn.Linear(dim1, dim2, bias=False))
        layers += ([nn.BatchNorm1d(dim2, affine=False)] if last_bn else []) if last else [nn.BatchNorm1d(dim2), nn.ReLU()]
    return nn.Sequential(*layers)


def same_layout(module: nn.Sequential, official: nn.Sequential) -> bool:
    ours, theirs = module.state_dict(), official.state_dict()
    def kind(m):  # fastkd's MeasuredLinear is an nn.Linear computing the same products
        return nn.Linear if isinstance(m, nn.Linear) else type(m)

    return ours.keys() == theirs.keys() and all(ours[k].shape == theirs[k].shape for k in ours) and [
        kind(m) for m in module] == [kind(m) for m in official]


def official_ctr(q: torch.Tensor, k: torch.Tensor, T: float) -> torch.Tensor:
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = torch.einsum("nc,mc->nm", q, k) / T
    return F.cross_entropy(logits, torch.arange(q.shape[0])) * (2 * T)


MOCO_HEADS = dict(proj_hidden_dim=64, pred_hidden_dim=64, out_dim=32)


@pytest.mark.parametrize("backbone, size", [
    (dict(arch="vit_small_patch16_224", kwargs=dict(embed_dim=48, depth=2, num_heads=4)), 224),
    (dict(arch="resnet50"), 64),
])
def test_mocov3_first_step_equals_the_official_formula(backbone, size):
    torch.manual_seed(0)
    method = build_method("mocov3", {"backbone": backbone, **MOCO_HEADS}).train()
    encoder, projector = method.base_encoder
    momentum, momentum_projector = method.momentum_encoder.module
    is_vit = encoder.is_vit
    for a, b in zip(method.base_encoder.parameters(), method.momentum_encoder.module.parameters()):
        assert torch.equal(a, b)  # the official momentum encoder starts as a copy of the base encoder
    width = encoder.embed_dim
    assert same_layout(projector.mlp, official_mlp(3 if is_vit else 2, width, 64, 32))
    assert same_layout(method.predictor.mlp, official_mlp(2, 32, 64, 32, last_bn=is_vit))
    T = 0.2 if is_vit else 1.0
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(4, 3, size, size, generator=g) for _ in range(2)]

    def features(backbone, x):
        if backbone.is_vit:
            return plain_vit(backbone, x)[0][:, 0]  # timm VisionTransformer: CLS token after the norm
        return backbone.model.forward_features(x).mean(dim=(2, 3))  # resnet avgpool + flatten

    out = method(Batch(views, torch.full((4,), -1), torch.arange(4)))
    q = [method.predictor(projector.mlp(features(encoder, x))) for x in views]
    with torch.no_grad():
        k = [momentum_projector.mlp(features(momentum, x)) for x in views]
    official = official_ctr(q[0], k[1], T) + official_ctr(q[1], k[0], T)
    assert_close_relative(out["loss"].detach(), official.detach(), "loss")
    compare_gradients(method, out["loss"], official)


# ---- MOKD ---------------------------------------------------------------------------------------

def weight_norm(layer) -> torch.Tensor:
    return layer.weight_g * layer.weight_v / layer.weight_v.norm(dim=1, keepdim=True)


def official_dino_head(head, x):
    return F.linear(F.normalize(head.mlp(x), dim=-1, p=2), weight_norm(head.last_layer))


def official_thead(thead, x, query=None):
    """``THead_CNN`` (maps ``[B, C, h, w]``; also returns the pooled 1x1-conv output) or ``THead_ViT``
    (tokens ``[B, N, D]``, ``D`` = the head width: no adapter)."""
    pool = None
    if x.dim() == 4:
        x = thead.adapter(x)
        pool = x.mean(dim=(2, 3))
        x = x.flatten(2).transpose(1, 2)
    side = int(math.sqrt(x.shape[1]))
    x = x + dino_interpolate_pos_encoding(thead.pos_embed, side, side, 1, prefix=0)
    if query is not None:
        x = torch.cat([query.unsqueeze(1), x], dim=1)
    for block in thead.blocks:
        x = plain_block(block, x)
    x = thead.norm(x)
    if query is not None:
        x = x[:, 1:]
    return F.linear(x.mean(dim=1), weight_norm(thead.last_layer)), pool


def official_branch(branch, crops):
    """Per crop list (concatenated, as the official wrappers): DINO head logits, T-head logits, the
    search query (ViT: CLS token; CNN: pooled 1x1-conv output) and the patches / map."""
    x = torch.cat(crops)
    backbone = branch.backbone
    if backbone.is_vit:
        tokens = plain_vit(backbone, x)[0]
        pooled, patches = tokens[:, 0], tokens[:, 1:]
        thead, _ = official_thead(branch.thead, patches)
        query = pooled
    else:
        patches = backbone.model.forward_features(x)
        pooled = patches.mean(dim=(2, 3))
        thead, query = official_thead(branch.thead, patches)
    return dict(dino=official_dino_head(branch.dino_head, pooled), thead=thead, query=query, patches=patches)


def official_dino_loss(student, teacher, ncrops):
    student = (student / STUDENT_TEMP).chunk(ncrops)
    teacher = F.softmax(teacher / T0, dim=-1).detach().chunk(2)  # centre 0 at the first step
    total, terms = 0, 0
    for i, q in enumerate(teacher):
        for v in range(len(student)):
            if v != i:
                total = total + torch.sum(-q * F.log_softmax(student[v], dim=-1), dim=-1).mean()
                terms += 1
    return total / terms


def official_search_loss(student, teacher):
    return torch.sum(-F.softmax(teacher / T0, dim=-1) * F.log_softmax(student / STUDENT_TEMP, dim=-1), dim=-1).mean()


def official_mokd(method, views, lambdas):
    ncrops, local = len(views), len(views) - 2
    student, teacher = {}, {}
    for x in "ab":
        g, loc = official_branch(method.branches[x], views[:2]), official_branch(method.branches[x], views[2:])
        student[x] = dict(dino=torch.cat([g["dino"], loc["dino"]]), thead=torch.cat([g["thead"], loc["thead"]]),
                          thead_local=loc["thead"], query_local=loc["query"])
    with torch.no_grad():
        for x in "ab":
            teacher[x] = official_branch(method.teachers[x].module, views[:2])
    parts, total = {}, 0
    for x, y in (("a", "b"), ("b", "a")):
        s, t_x, t_y = student[x], teacher[x], teacher[y]
        with torch.no_grad():  # the other model's teacher T-head over its global view 0, local queries
            patches = t_y["patches"].chunk(2)[0]
            patches = patches.repeat(local, *([1] * (patches.dim() - 1)))
            search, _ = official_thead(method.teachers[y].module.thead, patches, s["query_local"].detach())
        parts[f"{x}_self_mlp"] = official_dino_loss(s["dino"], t_x["dino"], ncrops)
        parts[f"{x}_self_thead"] = official_dino_loss(s["thead"], t_x["thead"], ncrops)
        parts[f"{x}_cross_mlp"] = official_dino_loss(s["dino"], t_y["dino"].detach(), ncrops)
        parts[f"{x}_cross_search"] = official_search_loss(s["thead_local"], search.detach())
        total = total + parts[f"{x}_self_mlp"] + parts[f"{x}_self_thead"] + lambdas[x] * (
            parts[f"{x}_cross_mlp"] + parts[f"{x}_cross_search"])
    return parts, total


VIT = dict(arch="vit_small_patch16_224", kwargs=dict(embed_dim=48, depth=1, num_heads=3, dynamic_img_size=True))
MOKD_HEADS = dict(out_dim=64, dino_hidden_dim=32, bottleneck_dim=16, thead_dim=48, thead_depth=2, thead_heads=6)


@pytest.mark.parametrize("model_a", [
    dict(arch="vit_small_patch16_224", kwargs=dict(embed_dim=48, depth=2, num_heads=6, dynamic_img_size=True)),
    dict(arch="resnet50"),
], ids=["vit_vit", "r50_vit"])
def test_mokd_first_step_equals_the_official_formula(model_a):
    torch.manual_seed(0)
    method = build_method("mokd", {"models": {"a": model_a, "b": VIT}, **MOKD_HEADS}).train()
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(2, 3, 224, 224, generator=g) for _ in range(2)]
    views += [torch.randn(2, 3, 96, 96, generator=g) for _ in range(2)]  # local crops: 6 x 6 ViT patches
    out = method(Batch(views, torch.full((2,), -1), torch.arange(2)))
    parts, official = official_mokd(method, views, {"a": method.config.lambda_a, "b": method.config.lambda_b})
    for name, value in parts.items():
        assert_close_relative(out[name].detach(), value.detach(), name)
    assert_close_relative(out["loss"].detach(), official.detach(), "loss")
    compare_gradients(method, out["loss"], official)
