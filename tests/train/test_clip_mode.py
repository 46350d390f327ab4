"""``optim.clip_mode``: ``per_param`` clips each parameter's gradient norm on its own (DINO's and
the official MOKD code's ``utils.clip_gradients``), ``norm`` the global norm (the default)."""

import copy

import pytest
import torch

from fastkd.train.distributed import DistEnv
from fastkd.train.optim import clip_grad_per_param_
from fastkd.train.options import OptimConfig, TrainConfig
from fastkd.train.trainer import Trainer
from tests.train.tiny_method import TensorLoader, TinyMethod

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _dino_clip_gradients(grads, clip):
    """DINO's utils.clip_gradients written out: per tensor, ``g *= clip / (||g|| + 1e-6)`` if < 1."""
    out = []
    for g in grads:
        coef = clip / (g.norm(2) + 1e-6)
        out.append(g * coef if coef < 1 else g.clone())
    return out


def test_clip_grad_per_param_matches_dino():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in ((4, 3), (7,), (2, 3, 2), (5,))]
    for p, scale in zip(params, (10.0, 1e-3, 1.0, 0.5)):
        p.grad = scale * torch.randn_like(p)
    params[3].grad = None  # parameters without a gradient are skipped
    raw = [p.grad.clone() for p in params[:3]]
    total = clip_grad_per_param_(params, 0.5)
    for p, want in zip(params[:3], _dino_clip_gradients(raw, 0.5)):
        torch.testing.assert_close(p.grad, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(total, torch.stack([g.norm() for g in raw]).norm())
    measured = clip_grad_per_param_(params[:3], float("inf"))  # measure only
    torch.testing.assert_close(measured, torch.stack([p.grad.norm() for p in params[:3]]).norm())
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_per_param_(params, 0)


class _Recording(TinyMethod):
    """Keeps the batches it saw and the gradients the optimiser is about to use (the hook runs
    after clipping)."""

    def __init__(self):
        super().__init__()
        self.batches, self.clipped = [], None

    def forward(self, batch):
        self.batches.append(batch)
        return super().forward(batch)

    def before_optimizer_step(self, epoch):
        self.clipped = [p.grad.clone() for p in self.parameters() if p.requires_grad]


@pytest.mark.parametrize("mode", ["per_param", "norm"])
def test_trainer_clip_mode(tmp_path, mode):
    torch.manual_seed(0)
    method = _Recording()
    reference = copy.deepcopy(method)
    clip = 0.05
    trainer = Trainer(method, TensorLoader(32, 8), batch_size=8, env=CPU,
                      train=TrainConfig(epochs=1, max_steps=1, precision="fp32", device="cpu",
                                        output_dir=str(tmp_path), progress=False, tensorboard=False),
                      optim=OptimConfig(name="sgd", lr=0.1, min_lr=0.1, clip_grad=clip, clip_mode=mode))
    stepped, _, norms = trainer.train_step(iter(trainer.loader), 0)
    assert stepped
    reference(method.batches[0])["loss"].backward()
    raw = [p.grad for p in reference.parameters() if p.requires_grad]
    if mode == "per_param":
        want = _dino_clip_gradients(raw, clip)
    else:
        total = torch.stack([g.norm() for g in raw]).norm()
        want = [g * min(1.0, clip / (total.item() + 1e-6)) for g in raw]
    assert any(g.norm() > clip for g in raw)  # the clip acts
    for got, expected in zip(method.clipped, want):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(norms["all"], torch.stack([g.norm() for g in raw]).norm(), rtol=1e-5, atol=0)


def test_clip_mode_is_checked_and_per_model():
    with pytest.raises(ValueError, match="optim.clip_mode"):
        OptimConfig(clip_mode="value")
    config = OptimConfig(clip_grad=3.0, per_model={"a": {"clip_mode": "per_param"}})
    assert config.clip_mode == "norm" and config.for_model("a").clip_mode == "per_param"
