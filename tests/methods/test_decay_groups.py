"""Which parameters each method decays, against the official recipes restated here.

- MoCo v3 (``main_moco.py``): the optimizer gets ``model.parameters()``: every parameter decayed
  (its LARS then skips tensors of <= 1 dim itself: tests/train/test_optim.py).
- MOKD (``main_mokd.py`` + ``utils.py``): the CNN (model a) through ``get_params_groups2(cnn,
  "transhead")``: every T-head parameter decayed, elsewhere biases (``.bias``) and 1-dim tensors not;
  the ViT (model b) through ``get_params_groups``: biases and 1-dim tensors not decayed.
- MAE (``main_pretrain.py``, timm's ``add_weight_decay``): biases and 1-dim tensors not decayed.
"""

import pytest

from fastkd.methods import build_method
from tests.methods.plain import TINY_MOCO, TINY_VIT, TINY_VIT_ARCH
from tests.methods.test_mokd import CONFIG as TINY_MOKD


def decayed_ids(groups) -> tuple[set, set]:
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    undecayed = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    return decayed, undecayed


def official_split(named, everything: bool = False) -> tuple[set, set]:
    """DINO's / MOKD's ``get_params_groups`` rule (or one decayed group when ``everything``)."""
    decayed, undecayed = set(), set()
    for name, param in named:
        if param.requires_grad:
            skip = not everything and (name.endswith(".bias") or param.dim() == 1)
            (undecayed if skip else decayed).add(id(param))
    return decayed, undecayed


@pytest.mark.parametrize("backbone", [dict(arch=TINY_VIT_ARCH, kwargs=TINY_VIT),
                                      dict(arch="resnet10t", kwargs=dict(channels=(8, 16, 32, 64), stem_width=8))])
def test_mocov3_decays_every_parameter(backbone):
    method = build_method("mocov3", {**TINY_MOCO, "backbone": backbone})
    assert decayed_ids(method.param_groups(0.1)) == official_split(method.named_parameters(), everything=True)
    old = build_method("mocov3", {**TINY_MOCO, "backbone": backbone, "decay_all_params": False})
    assert decayed_ids(old.param_groups(0.1)) == official_split(old.named_parameters())


def test_resmoco_follows_mocov3():
    method = build_method("resmoco", TINY_MOCO)
    assert decayed_ids(method.param_groups(0.1)) == official_split(method.named_parameters(), everything=True)


def test_mokd_decays_the_cnn_thead_entirely():
    method = build_method("mokd", TINY_MOKD)
    cnn, vit = method.branches["a"], method.branches["b"]
    thead = {id(p) for p in cnn.thead.parameters()}
    rest_a = [(n, p) for n, p in cnn.named_parameters() if id(p) not in thead]
    expected = [official_split(rest_a), official_split(cnn.thead.named_parameters(), everything=True),
                official_split(vit.named_parameters())]
    decayed, undecayed = decayed_ids(method.param_groups(0.04))
    assert decayed == set().union(*(e[0] for e in expected))
    assert undecayed == set().union(*(e[1] for e in expected))
    assert any(p.dim() == 1 and id(p) in decayed for p in cnn.thead.parameters())  # T-head LayerNorms decayed


def test_mae_keeps_biases_and_norms_undecayed():
    method = build_method("mae", {"backbone": dict(arch=TINY_VIT_ARCH, kwargs=TINY_VIT), "decoder_dim": 32,
                                  "decoder_depth": 1, "decoder_num_heads": 2})
    assert decayed_ids(method.param_groups(0.05)) == official_split(method.named_parameters())
