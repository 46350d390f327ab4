"""The trainer's settings: :class:`OptimConfig` (optimiser and schedules) and :class:`TrainConfig`
(run length, precision, checkpoints, logging). Both validate themselves on construction; the YAML
schema in :mod:`fastkd.config` is built from them."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from fastkd.checks import check_bool, check_choice, check_kwargs, check_number, check_str
from fastkd.suggest import did_you_mean
from fastkd.train.optim import CLIP_MODES, OPTIMIZERS
from fastkd.train.precision import PRECISIONS, TEACHER_PRECISIONS

SKIP_DECISIONS = ("auto", "host", "device")


@dataclass
class OptimConfig:
    """Peak lr: ``lr``, else ``blr * global_batch / reference_batch_size`` (global batch = per-rank
    batch x ranks x ``accum_steps``). lr: linear warm-up over ``warmup_epochs``, then cosine to
    ``min_lr``; weight decay: cosine from ``weight_decay`` to ``weight_decay_end`` (None: constant).
    ``clip_grad``: max grad norm (None: off) of all the optimiser's gradients (``clip_mode: norm``) or
    of each parameter's (``per_param``, DINO's / MOKD's ``clip_gradients``). ``per_model``: ``{tag:
    {field: value}}`` gives the parameter groups tagged ``"model": tag`` (MOKD) their own optimiser,
    schedules and clipping (any field but ``accum_steps``)."""

    name: str = "adamw"
    lr: float | None = None
    blr: float = 1.5e-4
    reference_batch_size: int = 256
    min_lr: float = 0.0
    warmup_epochs: float = 0.0
    weight_decay: float = 0.05
    weight_decay_end: float | None = None
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.9
    trust_coefficient: float = 0.001
    clip_grad: float | None = None
    clip_mode: str = "norm"
    accum_steps: int = 1
    per_model: dict = field(default_factory=dict)

    def __post_init__(self):
        check_choice("optim.name", self.name, OPTIMIZERS)
        for name in ("lr", "blr", "min_lr", "warmup_epochs", "weight_decay", "weight_decay_end", "eps",
                     "trust_coefficient"):
            if getattr(self, name) is not None or name not in ("lr", "weight_decay_end"):  # those two: None too
                check_number(f"optim.{name}", getattr(self, name), low=0)
        check_number("optim.reference_batch_size", self.reference_batch_size, low=1, integer=True)
        if not (isinstance(self.betas, (list, tuple)) and len(self.betas) == 2):
            raise TypeError(f"optim.betas must be two numbers in [0, 1), got {self.betas!r}")
        for i, beta in enumerate(self.betas):
            check_number(f"optim.betas[{i}]", beta, low=0, high=1, high_open=True)
        check_number("optim.momentum", self.momentum, low=0, high=1, high_open=True)
        if self.clip_grad is not None:
            check_number("optim.clip_grad", self.clip_grad, low=0, low_open=True)
        check_choice("optim.clip_mode", self.clip_mode, CLIP_MODES)
        check_number("optim.accum_steps", self.accum_steps, low=1, integer=True)
        check_kwargs("optim.per_model", self.per_model)
        allowed = [f.name for f in fields(self) if f.name not in ("accum_steps", "per_model")]
        for tag, overrides in self.per_model.items():
            check_kwargs(f"optim.per_model.{tag}", overrides)
            for key in overrides:
                if key not in allowed:
                    hint = did_you_mean(key, allowed, prefix=f"optim.per_model.{tag}.")
                    raise ValueError(f"unknown config key 'optim.per_model.{tag}.{key}'{hint} (accum_steps is shared "
                                     f"by all models; valid keys: {', '.join(allowed)})")
            self.for_model(tag)

    def for_model(self, tag) -> "OptimConfig":
        """The settings of the parameter groups tagged ``tag`` (``per_model`` overrides applied)."""
        return replace(self, per_model={}, **self.per_model.get(tag, {}))


@dataclass
class TrainConfig:
    """Run length (``epochs``, optionally capped by ``max_steps`` optimiser steps), ``seed``,
    ``precision`` (autocast dtype; ``fp16`` adds a GradScaler and needs CUDA), ``teacher_precision``
    (compute dtype of frozen pretrained teachers: ``auto``, ``same`` = ``precision``, or a dtype; see
    :mod:`fastkd.train.precision`), ``device``, ``compile`` (true / false / ``auto``: CUDA always,
    elsewhere where recorded step times say it repays; see :mod:`fastkd.train.compilation`) with
    ``compile_backend``, ``checkpointing`` (activation checkpointing of the student), ``sync_bn``
    (SyncBatchNorm under DDP on CUDA), a checkpoint every ``checkpoint_every`` steps into
    ``output_dir`` (newest ``keep_last`` kept), a log row every ``log_every`` steps, a stop after
    ``max_nonfinite`` consecutive non-finite steps. ``skip_decision``: where a non-finite step is
    decided: ``host`` (the flag read every step), ``device`` (fused optimisers and EMA updates skip on
    a device-side ``found_inf``; the host reads the flags at log and checkpoint steps only), ``auto``
    (``device`` on CUDA where every optimiser is torch's fused one, else ``host``).
    ``allow_shorter_schedule``: resume a checkpoint beyond this config's total steps (the run then
    ends at once) instead of refusing it as a likely mistake in ``epochs`` / ``max_steps``."""

    epochs: int = 100
    max_steps: int | None = None
    seed: int = 0
    precision: str = "bf16"
    teacher_precision: str = "auto"
    device: str = "auto"
    compile: bool | str = "auto"
    compile_backend: str = "inductor"
    checkpointing: bool = False
    sync_bn: bool = True
    find_unused_parameters: bool = False
    output_dir: str = "runs/fastkd"
    checkpoint_every: int = 1000
    keep_last: int = 3
    log_every: int = 10
    max_nonfinite: int = 5
    skip_decision: str = "auto"
    progress: bool = True
    tensorboard: bool = True
    allow_shorter_schedule: bool = False

    def __post_init__(self):
        check_number("train.epochs", self.epochs, low=1, integer=True)
        if self.max_steps is not None:
            check_number("train.max_steps", self.max_steps, low=1, integer=True)
        check_number("train.seed", self.seed, low=0, integer=True)
        check_choice("train.precision", self.precision, PRECISIONS)
        check_choice("train.teacher_precision", self.teacher_precision, TEACHER_PRECISIONS)
        check_choice("train.skip_decision", self.skip_decision, SKIP_DECISIONS)
        check_choice("train.device", self.device, ("auto", "cpu", "cuda"))
        if not (isinstance(self.compile, bool) or self.compile == "auto"):
            raise ValueError(f"train.compile must be true, false or 'auto', got {self.compile!r}")
        check_str("train.compile_backend", self.compile_backend)
        check_str("train.output_dir", self.output_dir)
        for name in ("checkpointing", "sync_bn", "find_unused_parameters", "progress", "tensorboard",
                     "allow_shorter_schedule"):
            check_bool(f"train.{name}", getattr(self, name))
        for name in ("checkpoint_every", "keep_last", "log_every", "max_nonfinite"):
            check_number(f"train.{name}", getattr(self, name), low=1, integer=True)
