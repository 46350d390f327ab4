"""The trainer's settings: :class:`OptimConfig` (optimiser and schedules) and :class:`TrainConfig`
(run length, precision, checkpoints, logging). Both validate themselves on construction; the YAML
schema in :mod:`fastkd.config` is built from them."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from fastkd.suggest import did_you_mean
from fastkd.train.optim import CLIP_MODES, OPTIMIZERS
from fastkd.train.precision import PRECISIONS, TEACHER_PRECISIONS

SKIP_DECISIONS = ("auto", "host", "device")


def _check(condition: bool, name: str, expected: str, value) -> None:
    if not condition:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class OptimConfig:
    """Peak lr is ``lr`` when given, else ``blr * global_batch / reference_batch_size`` (linear
    scaling; global batch = per-rank batch x ranks x ``accum_steps``). lr: linear warm-up over
    ``warmup_epochs`` then cosine to ``min_lr``; weight decay: cosine from ``weight_decay`` to
    ``weight_decay_end`` (constant when ``None``). ``clip_grad``: max grad norm (``None``: off);
    ``clip_mode``: ``"norm"`` clips the global norm of all the optimiser's gradients,
    ``"per_param"`` each parameter's gradient norm separately (DINO's / MOKD's ``clip_gradients``).

    ``per_model``: for methods that train several models (MOKD tags its parameter groups with
    ``"model": "a" | "b"``), ``{tag: {field: value}}`` gives that model its own optimiser, lr /
    weight-decay schedules and clipping (fields of this class except ``accum_steps``)."""

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
        _check(self.name in OPTIMIZERS, "optim.name", f"one of {OPTIMIZERS}", self.name)
        _check(self.lr is None or (_is_number(self.lr) and self.lr >= 0), "optim.lr", "None or a number >= 0", self.lr)
        for name in ("blr", "min_lr", "warmup_epochs", "weight_decay", "eps", "trust_coefficient"):
            value = getattr(self, name)
            _check(_is_number(value) and value >= 0, f"optim.{name}", "a number >= 0", value)
        _check(self.weight_decay_end is None or (_is_number(self.weight_decay_end) and self.weight_decay_end >= 0),
               "optim.weight_decay_end", "None or a number >= 0", self.weight_decay_end)
        _check(_is_int(self.reference_batch_size) and self.reference_batch_size > 0,
               "optim.reference_batch_size", "a positive int", self.reference_batch_size)
        _check(isinstance(self.betas, (list, tuple)) and len(self.betas) == 2
               and all(_is_number(b) and 0 <= b < 1 for b in self.betas), "optim.betas", "two numbers in [0, 1)",
               self.betas)
        _check(_is_number(self.momentum) and 0 <= self.momentum < 1, "optim.momentum", "a number in [0, 1)",
               self.momentum)
        _check(self.clip_grad is None or (_is_number(self.clip_grad) and self.clip_grad > 0),
               "optim.clip_grad", "None or a number > 0", self.clip_grad)
        _check(self.clip_mode in CLIP_MODES, "optim.clip_mode", f"one of {CLIP_MODES}", self.clip_mode)
        _check(_is_int(self.accum_steps) and self.accum_steps >= 1, "optim.accum_steps", "an int >= 1",
               self.accum_steps)
        _check(isinstance(self.per_model, dict), "optim.per_model", "a mapping {model tag: {field: value}}",
               self.per_model)
        allowed = [f.name for f in fields(self) if f.name not in ("accum_steps", "per_model")]
        for tag, overrides in self.per_model.items():
            _check(isinstance(overrides, dict), f"optim.per_model.{tag}", "a mapping of optim fields", overrides)
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
    (the compute dtype of frozen pretrained teachers: ``auto`` = bf16 / fp16 on CUDA, on CPU bf16 or
    fp32, whichever is faster as measured on the running machine and cached in the user cache
    directory, see :mod:`fastkd.train.precision`; ``same`` = ``precision``; or ``fp32`` / ``bf16`` /
    ``fp16``), ``device``,
    ``compile`` (``true`` / ``false`` / ``auto`` = on for CUDA; elsewhere on where step times recorded
    on this machine say the run repays the compilation: ``torch.compile`` of the method's whole forward
    with ``compile_backend``, see :mod:`fastkd.train.compilation`),
    ``checkpointing`` (activation checkpointing of the student), ``sync_bn`` (SyncBatchNorm under DDP on CUDA), checkpoints every
    ``checkpoint_every`` steps into ``output_dir`` (newest ``keep_last`` kept), a log row every
    ``log_every`` steps, and a stop after ``max_nonfinite`` consecutive non-finite losses.
    ``skip_decision``: where a non-finite step is decided: ``host`` (the flag is read every step:
    one wait for the device), ``device`` (the fused optimisers and the method's EMA updates skip on
    a device-side ``found_inf`` and the host reads the flags only at log and checkpoint steps, so
    messages and the ``max_nonfinite`` stop come at the next of those), ``auto`` (the default:
    ``device`` on CUDA where every optimiser is torch's fused one and the method's ``after_step``
    takes ``found_inf``, else ``host``).
    ``allow_shorter_schedule``: resume a checkpoint whose step is beyond this config's total steps
    (the run then ends at once); by default that is refused as a likely mistake in ``epochs`` /
    ``max_steps``."""

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
        _check(_is_int(self.epochs) and self.epochs >= 1, "train.epochs", "an int >= 1", self.epochs)
        _check(self.max_steps is None or (_is_int(self.max_steps) and self.max_steps >= 1),
               "train.max_steps", "None or an int >= 1", self.max_steps)
        _check(_is_int(self.seed) and self.seed >= 0, "train.seed", "an int >= 0", self.seed)
        _check(self.precision in PRECISIONS, "train.precision", f"one of {PRECISIONS}", self.precision)
        _check(self.teacher_precision in TEACHER_PRECISIONS, "train.teacher_precision",
               f"one of {TEACHER_PRECISIONS}", self.teacher_precision)
        _check(self.skip_decision in SKIP_DECISIONS, "train.skip_decision", f"one of {SKIP_DECISIONS}",
               self.skip_decision)
        _check(self.device in ("auto", "cpu", "cuda"), "train.device", "'auto', 'cpu' or 'cuda'", self.device)
        _check(isinstance(self.compile, bool) or self.compile == "auto", "train.compile", "true, false or 'auto'",
               self.compile)
        _check(isinstance(self.compile_backend, str) and self.compile_backend != "", "train.compile_backend",
               "a torch.compile backend name (e.g. 'inductor')", self.compile_backend)
        for name in ("checkpointing", "sync_bn", "find_unused_parameters", "progress", "tensorboard",
                     "allow_shorter_schedule"):
            _check(isinstance(getattr(self, name), bool), f"train.{name}", "true or false", getattr(self, name))
        _check(isinstance(self.output_dir, str) and self.output_dir != "", "train.output_dir", "a non-empty path",
               self.output_dir)
        for name in ("checkpoint_every", "keep_last", "log_every", "max_nonfinite"):
            value = getattr(self, name)
            _check(_is_int(value) and value >= 1, f"train.{name}", "an int >= 1", value)
