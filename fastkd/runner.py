"""Run a training job from a :class:`fastkd.config.RunConfig`: build the method and the loader, train
with :class:`fastkd.train.trainer.Trainer` (also under torchrun), then write the student backbone as
``<output_dir>/student.pt`` and, for methods with an EMA teacher (``Method.ema_teacher_backbone``:
MoCo v3, ResMoCo, MOKD), its backbone as ``<output_dir>/teacher.pt`` (``fastkd eval --weights teacher``)."""

from __future__ import annotations

from pathlib import Path

from fastkd.checks import check_instance
from fastkd.config import RunConfig
from fastkd.models.weights import STUDENT_FILE, TEACHER_FILE
from fastkd.train import distributed
from fastkd.train.rng import seed_everything
from fastkd.train.trainer import Trainer, TrainResult


def train_from_config(config: RunConfig, *, resume: bool = False) -> TrainResult:
    """Train the method of ``config``; returns how the run ended."""
    from fastkd.data import build_loader
    from fastkd.methods import build_method
    from fastkd.models import Backbone, save_backbone

    check_instance("config", config, RunConfig, "a fastkd.config.RunConfig")
    if not config.data.source:
        raise ValueError("data.source is empty: set it in the config or with data.source=PATH")
    env = distributed.init_distributed(config.train.device)
    try:
        seed_everything(config.train.seed)  # identical initial weights on every rank
        method = build_method(config.method_name, config.method_config)
        data = config.data
        loader = build_loader(
            data.source, data.recipe or method.recipe, batch_size=data.batch_size, backend=data.backend,
            device=str(env.device), rank=env.rank, world_size=env.world_size, seed=config.train.seed,
            drop_last=data.drop_last, num_workers=data.num_workers, exclude=data.exclude,
            skip_bad_images=data.skip_bad_images, **data.recipe_options,
        )
        trainer = Trainer(method, loader, batch_size=data.batch_size, train=config.train, optim=config.optim,
                          env=env, config=config.to_dict())
        try:
            result = trainer.fit(resume=resume)
        finally:
            loader.close()  # worker processes end with the run, not at interpreter exit
        if env.is_main and not result.preempted and isinstance(trainer.method.student, Backbone):
            path = save_backbone(trainer.method.student, Path(config.train.output_dir) / STUDENT_FILE)
            print(f"student backbone written to {path}", flush=True)
            teacher = trainer.method.ema_teacher_backbone
            if isinstance(teacher, Backbone):
                path = save_backbone(teacher, Path(config.train.output_dir) / TEACHER_FILE)
                print(f"EMA teacher backbone written to {path}", flush=True)
        return result
    finally:
        distributed.shutdown()
