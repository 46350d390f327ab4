"""A tiny, deterministic method-like module and an in-memory loader for the trainer tests, plus a
command-line entry (``python -m tests.train.tiny_method``) so tests can run training in a
subprocess (kill -9, SIGTERM, torchrun)."""

from __future__ import annotations

import argparse
import copy
import os
import signal
import sys

import torch
from torch import nn

from fastkd.data.batch import Batch
from fastkd.method_protocol import TrainingMethod


class TinyMethod(TrainingMethod):
    """Student conv+linear on view 0 regresses an EMA (momentum 0.95) teacher's output on view 1.

    ``noise``: adds ``torch.randn`` noise from the global RNG in forward (exercises RNG restore);
    ``nan_steps``: forward calls (0-based) whose loss is multiplied by NaN."""

    recipe = "mocov3"

    def __init__(self, dim: int = 8, noise: bool = False, nan_steps: tuple = ()):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.LazyLinear(dim))
        self.net(torch.zeros(1, 3, 8, 8))
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim))
        self.teacher = copy.deepcopy(self.net).requires_grad_(False)
        self.noise = noise
        self.nan_steps = set(nan_steps)
        self.calls = 0
        self.after_step_calls = []

    def forward(self, batch: Batch) -> dict:
        student_view, teacher_view = batch.views
        if self.noise:
            student_view = student_view + 0.1 * torch.randn_like(student_view)
        prediction = self.head(self.student(student_view))
        with torch.no_grad():
            target = self.teacher(teacher_view)
        regression = (prediction.float() - target.float()).pow(2).mean()
        decay = 1e-3 * prediction.float().pow(2).mean()
        loss = regression + decay
        if self.calls in self.nan_steps:
            loss = loss * float("nan")
        self.calls += 1
        return {"loss": loss, "regression": regression.detach(), "decay": decay.detach()}

    @property
    def student(self) -> nn.Module:
        return self.net

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int, found_inf=None) -> None:
        self.after_step_calls.append(step)
        weight = 0.05 if found_inf is None else 0.05 * (1 - found_inf)  # a skipped step leaves the teacher
        for t, s in zip(self.teacher.parameters(), self.student.parameters()):
            t.lerp_(s, weight)


class TensorLoader:
    """``images`` deterministic 8x8 images of ``classes`` classes, two augmented views each.
    Per epoch a seeded permutation; global batch ``b`` is ``perm[b*G:(b+1)*G]`` with
    ``G = batch_size * world_size`` and rank ``r`` gets its ``r``-th slice, so any number of ranks
    sees the same global batches. View noise depends only on (seed, epoch, index)."""

    def __init__(self, images: int = 64, batch_size: int = 8, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, classes: int = 4):
        generator = torch.Generator().manual_seed(1234)
        self.labels = torch.arange(images) % classes
        centres = torch.randn(classes, 3, 8, 8, generator=generator)
        self.images = centres[self.labels] + 0.3 * torch.randn(images, 3, 8, 8, generator=generator)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images) // (self.batch_size * self.world_size)

    def __iter__(self):
        perm = torch.randperm(len(self.images), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        global_batch = self.batch_size * self.world_size
        for b in range(len(self)):
            start = b * global_batch + self.rank * self.batch_size
            index = perm[start:start + self.batch_size]
            views = []
            for v in range(2):
                g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch * 1009 + v)
                noise = torch.randn(len(self.images), 3, 8, 8, generator=g)[index]
                views.append(self.images[index] + 0.1 * noise)
            yield Batch(views=views, labels=self.labels[index], indices=index)


def main(argv=None) -> None:
    from fastkd.train import distributed
    from fastkd.train.options import OptimConfig, TrainConfig
    from fastkd.train.trainer import Trainer

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--noise", action="store_true")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--checkpoint-every", type=int, default=2)
    parser.add_argument("--kill-at-step", type=int, default=-1, help="SIGKILL itself after this step")
    parser.add_argument("--sleep-after-step", type=int, default=-1, help="wait for a signal after this step")
    args = parser.parse_args(argv)

    env = distributed.init_distributed("cpu")
    torch.manual_seed(0)
    method = TinyMethod(noise=args.noise)
    per_rank = args.global_batch // (env.world_size * args.accum)
    loader = TensorLoader(64, per_rank, rank=env.rank, world_size=env.world_size)

    def after_step(step, total, found_inf=None, original=method.after_step):
        original(step, total, found_inf)
        if step == args.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == args.sleep_after_step:
            # Block SIGTERM before announcing READY so a signal sent at once cannot land before the
            # wait (signal.pause() would then sleep forever); deliver it to the trainer's handler after.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            print("READY", flush=True)
            signal.sigwait({signal.SIGTERM})
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
            signal.raise_signal(signal.SIGTERM)

    method.after_step = after_step
    trainer = Trainer(
        method, loader, batch_size=per_rank, env=env, config={"test": "tiny"},
        train=TrainConfig(epochs=args.epochs, precision="fp32", device="cpu", output_dir=args.out,
                          checkpoint_every=args.checkpoint_every, log_every=1, progress=False, tensorboard=False),
        optim=OptimConfig(name="adamw", lr=1e-2, warmup_epochs=0.5, weight_decay=0.05, accum_steps=args.accum),
    )
    result = trainer.fit(resume=args.resume)
    if env.is_main:
        torch.save({"method": method.state_dict(), "step": result.step, "preempted": result.preempted},
                   os.path.join(args.out, "final.pt"))
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1:])
