"""One trainer for every method, through its protocol (:class:`fastkd.method_protocol.TrainingMethod`).

One optimiser step = ``accum_steps`` micro-batches, each ``loss / accum_steps`` backpropagated
(under DDP only the last one all-reduces). Per step, in order: schedules -> forward/backward ->
non-finite check (agreed across ranks) -> unscale, clip (global norm per optimiser, or per
parameter with ``optim.clip_mode=per_param``) -> ``before_optimizer_step(epoch)`` -> optimiser
step(s) -> ``after_step`` -> log -> checkpoint -> stop request check (SIGTERM/SIGINT). Parameter
groups tagged ``"model": tag`` (MOKD) get their own optimiser and schedules when ``optim.per_model``
names the tag.

A step whose loss (any rank, any micro-batch) or gradient norm is not finite is skipped: its batches
are consumed and the step counter advances, but neither the optimiser nor ``after_step``'s teacher
updates change anything; ``max_nonfinite`` consecutive skips raise :class:`NonFiniteLossError`.
``train.skip_decision`` says where the skip is decided: on the host (the flag read every step) or on
the device (``found_inf`` handed to torch's fused optimisers and to ``after_step``; the host reads
the flags at log and checkpoint steps only; see :meth:`Trainer._update`).

Exact resume: the checkpoint holds the method's state, optimisers, GradScaler, schedules, step, data
position and every rank's RNG state. On resume the config's schedules are used (a warning names any
that changed), the batches already consumed in the epoch are skipped under ``fork_rng`` and training
continues; with a loader whose randomness depends only on (seed, epoch, index) the resumed run is
bit-identical on CPU.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.profiler import record_function

from fastkd.checks import check_instance, check_positive_ints
from fastkd.method_protocol import TrainingMethod
from fastkd.train import distributed
from fastkd.train.checkpoint import CheckpointManager, TrainingState
from fastkd.train.compilation import (TRIAL_STEPS, compile_entry, compile_method, compile_trial_due, record_run,
                                      should_compile)
from fastkd.train.distributed import DistEnv
from fastkd.train.logging import TrainLogger
from fastkd.train.optim import apply_schedules, build_optimizer, clip_grad_per_param_, step_unless, takes_found_inf
from fastkd.train.options import OptimConfig, TrainConfig
from fastkd.train.precision import DTYPES, autocast, teacher_precision_for
from fastkd.train.preemption import StopRequest
from fastkd.train.rng import capture_rng_state, restore_rng_state, seed_everything
from fastkd.train.schedules import WarmupCosine, scaled_lr

# Profiler ranges of the step's phases (``torch.profiler`` traces show them; ``fastkd bench e2e``
# sums them into its per-phase breakdown). ``after_step``: EMA teacher updates and schedules.
PHASES = {"data": "fastkd/data", "forward": "fastkd/forward", "backward": "fastkd/backward",
          "optimizer": "fastkd/optimizer", "after_step": "fastkd/after_step"}

class NonFiniteLossError(RuntimeError):
    """Raised after ``max_nonfinite`` consecutive steps with a non-finite loss or gradient."""


@dataclass
class TrainResult:
    """How a :meth:`Trainer.fit` call ended."""

    step: int
    total_steps: int
    skipped_steps: int
    preempted: bool
    checkpoint: Path | None
    summary: dict


def _tensor_parts(outputs: dict, device: torch.device) -> dict:
    """Every scalar tensor / number of the method's output dict as a detached fp32 0-dim tensor on
    ``device`` (no host synchronisation: read them as floats only when logging)."""
    parts = {}
    for name, value in outputs.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            parts[name] = value.detach().reshape(()).float()
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            parts[name] = torch.tensor(float(value), device=device)
    return parts


def _floats(values: dict) -> dict:
    """``{name: float}`` of device scalars (one transfer for all of them)."""
    if not values:
        return {}
    names = list(values)
    return dict(zip(names, torch.stack([values[n].float().cpu() if isinstance(values[n], torch.Tensor)
                                        else torch.tensor(float(values[n])) for n in names]).tolist()))


@dataclass
class _Slot:
    """One optimiser over some parameter groups with its own schedules and clipping."""

    name: str
    config: OptimConfig
    optimizer: torch.optim.Optimizer
    params: list
    lr: WarmupCosine
    weight_decay: WarmupCosine

    @property
    def max_grad_norm(self) -> float:
        """``clip_grad`` or infinity (the norm is then only measured)."""
        return math.inf if self.config.clip_grad is None else float(self.config.clip_grad)


def _slot_metrics(rates: dict, grad_norms: dict) -> dict:
    """``lr``, ``weight_decay``, ``grad_norm`` (suffixed ``_<model>`` when there are several optimisers)."""
    out = {}
    for name, (lr, wd) in rates.items():
        suffix = "" if len(rates) == 1 else f"_{name}"
        out[f"lr{suffix}"], out[f"weight_decay{suffix}"] = lr, wd
        out[f"grad_norm{suffix}"] = grad_norms.get(name, math.nan)
    return out


class Trainer:
    """Trains ``method`` on batches of ``loader`` (an iterable with ``len()`` — batches per epoch
    on this rank — and optionally ``set_epoch(epoch)``, yielding ``fastkd.data.Batch`` on the
    right device). ``batch_size`` is the per-rank batch size (for linear lr scaling and images/s).
    ``config`` (a plain dict, e.g. the whole run config) is stored in every checkpoint."""

    def __init__(self, method: TrainingMethod, loader, *, batch_size: int, train: TrainConfig | None = None,
                 optim: OptimConfig | None = None, env: DistEnv | None = None, config: dict | None = None):
        self.train_cfg, self.optim_cfg, self.config = train or TrainConfig(), optim or OptimConfig(), config or {}
        for name, value, kind in (("method", method, TrainingMethod), ("train", self.train_cfg, TrainConfig),
                                  ("optim", self.optim_cfg, OptimConfig), ("config", self.config, dict)):
            check_instance(name, value, kind, f"a {kind.__module__}.{kind.__qualname__}")
        if not (hasattr(loader, "__iter__") and hasattr(loader, "__len__")):
            raise TypeError(f"loader must be an iterable with len(), got {type(loader).__name__}")
        check_positive_ints(batch_size=batch_size)
        self.env = env or distributed.init_distributed(self.train_cfg.device)
        self.teacher_precision = teacher_precision_for(self.train_cfg.teacher_precision, self.train_cfg.precision,
                                                       self.env.device)
        for name, value in (("precision", self.train_cfg.precision), ("teacher_precision", self.teacher_precision)):
            if value == "fp16" and self.env.device.type != "cuda":
                raise ValueError(f"train.{name}='fp16' needs CUDA; use 'bf16' or 'fp32' on CPU")
        self.method, self.loader, self.batch_size = method, loader, batch_size
        accum = self.optim_cfg.accum_steps
        self.steps_per_epoch = len(loader) // accum
        if self.steps_per_epoch < 1:
            raise ValueError(f"the loader yields {len(loader)} batches per epoch, fewer than "
                             f"optim.accum_steps={accum}: not one optimiser step per epoch")
        total = self.steps_per_epoch * self.train_cfg.epochs
        self.total_steps = min(total, self.train_cfg.max_steps or total)
        self.global_batch_size = batch_size * self.env.world_size * accum
        self.checkpoints = CheckpointManager(Path(self.train_cfg.output_dir) / "checkpoints",
                                             keep_last=self.train_cfg.keep_last)
        self._prepare_model()

    # -- set-up -------------------------------------------------------------------------------
    def _prepare_model(self) -> None:
        cfg, env = self.train_cfg, self.env
        method = self.method.to(env.device)
        method.frozen_teacher_dtype = DTYPES[self.teacher_precision]
        if env.is_distributed and cfg.sync_bn:
            if env.device.type == "cuda":
                method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
            elif env.is_main and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in method.modules()):
                print("warning: SyncBatchNorm needs CUDA; on CPU BatchNorm statistics stay per process", flush=True)
        if cfg.checkpointing:
            self._enable_activation_checkpointing(method)
        self.compile_entry = compile_entry(method, self.batch_size, cfg.precision)
        self.compiled = should_compile(cfg.compile, env.device, self.compile_entry, self.total_steps)
        if self.compiled:
            compile_method(method, backend=cfg.compile_backend)
        self.method = method
        self.slots = self._build_slots(method.param_groups(1.0))
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.precision == "fp16")
        self.device_skip = self._resolve_skip_decision()
        self.model = method
        if env.is_distributed:
            self.model = nn.parallel.DistributedDataParallel(
                method, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                find_unused_parameters=cfg.find_unused_parameters,
            )

    def _resolve_skip_decision(self) -> bool:
        """``train.skip_decision`` -> whether the skip is decided on the device."""
        decision = self.train_cfg.skip_decision
        blockers = [f"optimiser {slot.name!r} is {type(slot.optimizer).__name__} "
                    f"(fused={slot.optimizer.defaults.get('fused')}), not torch's fused Adam / AdamW / SGD"
                    for slot in self.slots if not takes_found_inf(slot.optimizer)]
        if self.scaler.is_enabled():
            blockers.append("precision fp16: its GradScaler decides the skips")
        if decision == "device" and blockers:
            raise ValueError(f"train.skip_decision='device' is not possible here: {'; '.join(blockers)}; "
                             "use 'auto' or 'host'")
        return decision != "host" and not blockers and (decision == "device" or self.env.device.type == "cuda")

    @staticmethod
    def _enable_activation_checkpointing(method: nn.Module) -> None:
        """Switch on ``checkpointing`` of every trainable backbone (``fastkd.models.Backbone``
        recomputes its blocks in the backward when its ``checkpointing`` flag is set)."""
        trainable = [m for m in method.modules() if isinstance(getattr(m, "checkpointing", None), bool)
                     and any(p.requires_grad for p in m.parameters())]
        if not trainable:
            raise ValueError(f"train.checkpointing=true but {type(method).__name__} has no trainable module with a "
                             "'checkpointing' switch (a fastkd.models.Backbone)")
        for module in trainable:
            module.checkpointing = True

    def _build_slots(self, param_groups: list[dict]) -> list[_Slot]:
        """One optimiser (+ schedules) per ``model`` tag named in ``optim.per_model``, one for all
        other groups."""
        by_tag: dict = {}
        for group in param_groups:
            tag = group.get("model") if group.get("model") in self.optim_cfg.per_model else None
            by_tag.setdefault(tag, []).append(group)
        unknown = set(self.optim_cfg.per_model) - set(by_tag)
        if unknown:
            tags = sorted({str(g.get("model")) for g in param_groups if "model" in g})
            raise ValueError(f"optim.per_model names {sorted(unknown)}, but the method's parameter groups are "
                             f"tagged {tags or 'with no model tag'}")
        slots = []
        for tag, groups in by_tag.items():
            cfg = self.optim_cfg.for_model(tag)
            optimizer = build_optimizer(groups, cfg.name, betas=tuple(cfg.betas), eps=cfg.eps,
                                        momentum=cfg.momentum, trust_coefficient=cfg.trust_coefficient)
            peak = cfg.lr if cfg.lr is not None else scaled_lr(cfg.blr, self.global_batch_size,
                                                                 cfg.reference_batch_size)
            warmup = min(self.total_steps, round(cfg.warmup_epochs * self.steps_per_epoch))
            wd_end = cfg.weight_decay if cfg.weight_decay_end is None else cfg.weight_decay_end
            slots.append(_Slot(
                name="all" if tag is None else str(tag), config=cfg, optimizer=optimizer,
                params=[p for group in optimizer.param_groups for p in group["params"]],
                lr=WarmupCosine(peak=peak, total_steps=self.total_steps, warmup_steps=warmup, end=cfg.min_lr),
                weight_decay=WarmupCosine(peak=cfg.weight_decay, total_steps=self.total_steps, end=wd_end),
            ))
        return slots

    # -- checkpoints --------------------------------------------------------------------------
    def _state(self, step: int, skipped: int, consecutive: int, rng_states: list) -> TrainingState:
        return TrainingState(
            step=step, total_steps=self.total_steps, epoch=step // self.steps_per_epoch,
            batches_in_epoch=(step % self.steps_per_epoch) * self.optim_cfg.accum_steps,
            world_size=self.env.world_size, method=self.method.state_dict(),
            optimizers={slot.name: slot.optimizer.state_dict() for slot in self.slots}, scaler=self.scaler.state_dict(),
            schedules={slot.name: {"lr": slot.lr.state_dict(), "weight_decay": slot.weight_decay.state_dict()}
                       for slot in self.slots},
            skipped=skipped, consecutive=consecutive, rng=rng_states, config=self.config)

    def _save(self, step: int, skipped: int, consecutive: int) -> Path | None:
        rng_states = distributed.gather_objects(capture_rng_state())
        path = None
        if self.env.is_main:
            path = self.checkpoints.save(self._state(step, skipped, consecutive, rng_states).to_dict(), step)
        distributed.barrier()
        return path

    def _resume(self) -> tuple[int, int, int]:
        """Load the newest readable checkpoint; returns ``(step, skipped, consecutive)``."""
        loaded = self.checkpoints.load_latest(map_location="cpu")  # RNG states must stay CPU tensors
        if loaded is None:
            if self.env.is_main:
                print(f"no checkpoint in {self.checkpoints.directory}: starting from step 0", flush=True)
            return 0, 0, 0
        state, path = TrainingState.from_dict(loaded[0], loaded[1]), loaded[1]
        position = (state.step // self.steps_per_epoch, (state.step % self.steps_per_epoch) * self.optim_cfg.accum_steps)
        if position != (state.epoch, state.batches_in_epoch):
            raise ValueError(f"{path} stopped at epoch {state.epoch}, batch {state.batches_in_epoch}, but with "
                             f"this loader ({len(self.loader)} batches per epoch) its step {state.step} maps to "
                             f"epoch {position[0]}, batch {position[1]}: the dataset, batch size or accum_steps changed")
        if state.step > self.total_steps and not self.train_cfg.allow_shorter_schedule:
            cfg = self.train_cfg
            raise ValueError(f"{path} is at step {state.step}, beyond this run's {self.total_steps} steps "
                             f"(train.epochs={cfg.epochs} x {self.steps_per_epoch} steps per epoch, "
                             f"train.max_steps={cfg.max_steps}): raise train.epochs / train.max_steps to continue "
                             "the run, or set train.allow_shorter_schedule=true to end it at its checkpoint")
        self.method.load_state_dict(state.method)
        names = sorted(slot.name for slot in self.slots)
        if sorted(state.optimizers) != names:
            raise ValueError(f"{path} holds optimisers {sorted(state.optimizers)}, this run has {names}: "
                             "optim.per_model differs from the checkpointed run")
        for slot in self.slots:
            slot.optimizer.load_state_dict(state.optimizers[slot.name])
            for kind, schedule in (("lr", slot.lr), ("weight_decay", slot.weight_decay)):
                saved = state.schedules[slot.name][kind]
                if saved != schedule.state_dict() and self.env.is_main:
                    print(f"warning: the config changed the {kind} schedule of optimiser {slot.name!r} since "
                          f"{path} ({saved} -> {schedule.state_dict()}); continuing with the new one", flush=True)
        self.scaler.load_state_dict(state.scaler)
        if state.world_size != self.env.world_size and self.env.is_main:
            print(f"warning: {path} was written by {state.world_size} ranks, resuming on "
                  f"{self.env.world_size}: data order and RNG streams differ from an uninterrupted run", flush=True)
        restore_rng_state(state.rng[self.env.rank % len(state.rng)])
        if self.env.is_main:
            print(f"resumed from {path} at step {state.step}", flush=True)
        return state.step, state.skipped, state.consecutive

    # -- the loop -----------------------------------------------------------------------------
    def _batches(self, epoch: int, skip: int):
        """Iterator over the loader's ``epoch`` with its first ``skip`` batches consumed; neither
        creating the iterator nor skipping draws from the global RNGs."""
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(epoch)
        devices = [self.env.device] if self.env.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            iterator = iter(self.loader)
            for _ in range(skip):
                next(iterator)
        return self._whole_epoch(iterator, epoch, skip)

    def _whole_epoch(self, iterator, epoch: int, position: int):
        """``iterator``, with a clear error instead of StopIteration when the epoch ends before
        ``len(loader)`` batches (a loader that skips bad images drops a batch left empty)."""
        for batch in iterator:
            position += 1
            yield batch
        raise ValueError(f"the loader ended epoch {epoch} after {position} batches, but len(loader) is "
                         f"{len(self.loader)}: with data.skip_bad_images a batch whose images were all undecodable "
                         "is dropped; run `fastkd data scan` and pass its exclusion list as data.exclude=")

    def _forward_backward(self, batches, step: int) -> tuple[torch.Tensor, dict, int]:
        """All micro-batches of one step; returns ``(non-finite flag, loss parts, images)``, the flag
        and the parts as device tensors (nothing here waits for the device)."""
        accum = self.optim_cfg.accum_steps
        nonfinite, parts_sum, images = None, {}, 0
        for micro in range(accum):
            with record_function(PHASES["data"]):
                batch = next(batches)
            images += int(batch.views[0].shape[0]) if hasattr(batch, "views") else self.batch_size
            sync = micro == accum - 1 or not self.env.is_distributed
            with contextlib.nullcontext() if sync else self.model.no_sync():
                with autocast(self.train_cfg.precision, self.env.device), record_function(PHASES["forward"]):
                    outputs = self.model(batch)
                loss = outputs.get("loss") if isinstance(outputs, dict) else None
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
                    raise TypeError(f"step {step}: method.forward must return a dict whose 'loss' is a scalar tensor "
                                    f"requiring grad, got a {type(outputs).__name__} with loss {type(loss).__name__} "
                                    f"{tuple(getattr(loss, 'shape', ()))}")
                parts = _tensor_parts(outputs, loss.device)
                for name, value in parts.items():
                    parts_sum[name] = parts_sum[name] + value / accum if name in parts_sum else value / accum
                bad = ~torch.isfinite(parts["loss"])
                nonfinite = bad if nonfinite is None else nonfinite | bad
                # a non-finite micro-batch still runs backward (deciding would wait for the device);
                # the whole step is skipped below
                with record_function(PHASES["backward"]):
                    self.scaler.scale(loss / accum).backward()
        return nonfinite, parts_sum, images

    def _update(self, step: int, nonfinite: torch.Tensor) -> tuple[bool | torch.Tensor, dict]:
        """Unscale and clip every optimiser's gradients; unless the loss or a norm is non-finite on some
        rank (an fp16 GradScaler handles its overflow itself), step them and call ``after_step``.
        Returns ``(skipped, grad norms as device tensors)``: ``skipped`` is a bool read from the device
        (host decision: the step's one wait for it), or under :attr:`device_skip` the 0-dim fp32
        ``found_inf`` tensor (1 = skipped; max across ranks) that the fused optimisers and
        ``after_step(..., found_inf=...)`` honour without a host read."""
        grad_norms = {}
        with record_function(PHASES["optimizer"]):
            for slot in self.slots:
                self.scaler.unscale_(slot.optimizer)
                clip = clip_grad_per_param_ if slot.config.clip_mode == "per_param" else nn.utils.clip_grad_norm_
                grad_norms[slot.name] = clip(slot.params, slot.max_grad_norm)
        bad = nonfinite.clone()
        if not self.scaler.is_enabled():
            for norm in grad_norms.values():
                bad |= ~torch.isfinite(norm.to(bad.device))
        if self.device_skip:
            found_inf = distributed.max_across_ranks_(bad.to(torch.float32).reshape(()))
        elif distributed.any_across_ranks(bad, self.env.device):
            return True, grad_norms
        self.method.before_optimizer_step(step / self.steps_per_epoch)
        with record_function(PHASES["optimizer"]):
            for slot in self.slots:
                if self.device_skip:
                    step_unless(slot.optimizer, found_inf)
                else:
                    self.scaler.step(slot.optimizer)
            self.scaler.update()
        with record_function(PHASES["after_step"]):
            if self.device_skip:
                self.method.after_step(step, self.total_steps, found_inf=found_inf)
                return found_inf, grad_norms
            self.method.after_step(step, self.total_steps)
        return False, grad_norms

    def train_step(self, batches, step: int) -> tuple[bool | torch.Tensor, dict, dict]:
        """One optimiser step as :meth:`fit` runs it (batches from the iterator ``batches``), without
        logging, checkpoints or stop handling: for benchmarks and custom loops. Returns ``(stepped, loss
        parts, grad norms)``, ``stepped`` a bool or (device decision) a 0-dim bool device tensor."""
        self._apply_schedules(step)
        nonfinite, parts, _ = self._forward_backward(batches, step)
        skipped, grad_norms = self._update(step, nonfinite)
        self._clear_grads()
        return (skipped == 0) if isinstance(skipped, torch.Tensor) else not skipped, parts, grad_norms

    def _apply_schedules(self, step: int) -> dict:
        """Set every optimiser's lr and weight decay for ``step``; returns ``{slot: (lr, wd)}``."""
        rates = {}
        for slot in self.slots:
            rates[slot.name] = (slot.lr(step), slot.weight_decay(step))
            apply_schedules(slot.optimizer, *rates[slot.name])
        return rates

    def _clear_grads(self) -> None:
        for slot in self.slots:
            slot.optimizer.zero_grad(set_to_none=True)

    def _settle(self, pending: list, skipped: int, consecutive: int, logger: TrainLogger) -> tuple[int, int]:
        """Count the skipped steps among ``pending`` ``(step, skip flag, loss parts, grad norms)``
        records (device flags read in one transfer), a message each; :class:`NonFiniteLossError` after
        ``max_nonfinite`` in a row. Returns the updated ``(skipped, consecutive)``."""
        if not pending:
            return skipped, consecutive
        flags = [flag for _, flag, _, _ in pending]
        if isinstance(flags[0], torch.Tensor):
            flags = [value > 0 for value in torch.stack(flags).cpu().tolist()]
        for (step, _, parts, grad_norms), bad in zip(pending, flags):
            if not bad:
                consecutive = 0
                continue
            skipped += 1
            consecutive += 1
            parts = distributed.mean_across_ranks(_floats(parts), self.env.device)  # NaN if any rank had one
            what = ", ".join(f"{name}={value:.6g}" for name, value in
                             {**parts, **{f"grad_norm_{k}": v for k, v in _floats(grad_norms).items()}}.items())
            logger.message(f"step {step}: non-finite loss or gradient, step skipped ({what}); "
                           f"{consecutive} in a row, {skipped} in total")
            if consecutive >= self.train_cfg.max_nonfinite:
                message = (f"stopping at step {step}: {consecutive} consecutive non-finite steps "
                           f"(train.max_nonfinite={self.train_cfg.max_nonfinite}); last loss parts: {what}")
                logger.close({"steps": step, "skipped_steps": skipped, "stopped": message})
                raise NonFiniteLossError(message)
        return skipped, consecutive

    def fit(self, resume: bool = False) -> TrainResult:
        """Train to ``total_steps`` (or until SIGTERM/SIGINT); with ``resume`` continue from the
        newest readable checkpoint in ``<output_dir>/checkpoints``."""
        cfg, env = self.train_cfg, self.env
        if not resume and self.checkpoints.checkpoints():
            raise ValueError(f"{self.checkpoints.directory} already holds checkpoints of a run: continue it with "
                             "resume (--resume) or choose another train.output_dir")
        if env.is_main:  # an interrupted checkpoint write leaves its temporary file behind
            if removed := self.checkpoints.remove_stale_temp_files():
                print(f"removed {len(removed)} stale temporary checkpoint file(s) of an interrupted write from "
                      f"{self.checkpoints.directory}: {', '.join(p.name for p in removed)}", flush=True)
        seed_everything(cfg.seed + env.rank)
        step, skipped, consecutive = self._resume() if resume else (0, 0, 0)
        logger = TrainLogger(cfg.output_dir, total_steps=self.total_steps, start_step=step, enabled=env.is_main,
                             progress=cfg.progress, tensorboard=cfg.tensorboard)
        self.model.train()
        last_checkpoint, preempted = None, False
        window_images, window_start = 0, time.perf_counter()
        run_start, run_images, start_step = time.perf_counter(), 0, step
        batches, pending = None, []  # pending: steps whose device-side skip flag the host has not read yet
        step_seconds = []  # wall time of each step's work (for train.compile: auto, see fastkd.train.compilation)
        compiled_from = 0 if self.compiled else None
        with StopRequest() as stop:
            while step < self.total_steps:
                if batches is None or step % self.steps_per_epoch == 0:
                    batches = self._batches(step // self.steps_per_epoch,
                                            (step % self.steps_per_epoch) * self.optim_cfg.accum_steps)
                step_start = time.perf_counter()
                rates = self._apply_schedules(step)
                try:
                    nonfinite, parts, images = self._forward_backward(batches, step)
                except Exception:
                    if not stop.requested or env.world_size > 1:
                        raise  # under DDP the other ranks would wait in this step's collectives
                    # the signal also killed data workers: stop at the last completed step
                    self._clear_grads()
                    skipped, consecutive = self._settle(pending, skipped, consecutive, logger)
                    last_checkpoint, preempted = self._save(step, skipped, consecutive), True
                    logger.message(f"stop requested ({stop.signal_name}) while step {step + 1} was running and it "
                                   f"failed; checkpoint at step {step} written, exiting; continue with --resume")
                    break
                skip_flag, grad_norms = self._update(step, nonfinite)
                pending.append((step, skip_flag, parts, grad_norms))
                if not self.device_skip:  # the flag is a bool already: count it now
                    skipped, consecutive = self._settle(pending, skipped, consecutive, logger)
                    pending = []
                self._clear_grads()
                step_seconds.append(time.perf_counter() - step_start)
                if compiled_from is None and len(step_seconds) == TRIAL_STEPS and distributed.any_across_ranks(
                        compile_trial_due(cfg.compile, env.device, self.compile_entry, step_seconds,
                                          self.total_steps - step - 1), env.device):
                    compile_method(self.method, backend=cfg.compile_backend)
                    self.compiled, compiled_from = True, len(step_seconds)
                    logger.message(f"train.compile auto: compiling from step {step + 2} on (a trial: "
                                   "no compiled run of this method is recorded on this machine)")
                step += 1
                window_images += images * env.world_size
                run_images += images * env.world_size
                logger.advance()
                log_now = step % cfg.log_every == 0 or step == self.total_steps
                stop_now = distributed.any_across_ranks(stop.requested, env.device)
                save_now = step % cfg.checkpoint_every == 0 or step == self.total_steps or stop_now
                if pending and (log_now or save_now):  # device decision: read the window's flags now
                    skipped, consecutive = self._settle(pending, skipped, consecutive, logger)
                    pending = []
                if log_now:
                    elapsed = time.perf_counter() - window_start
                    parts = distributed.mean_across_ranks(_floats(parts), env.device)
                    logger.log({"step": step, "epoch": (step - 1) // self.steps_per_epoch, **parts,
                                **_slot_metrics(rates, _floats(grad_norms)),
                                "images_per_s": window_images / max(elapsed, 1e-9), "skipped_steps": skipped})
                    window_images, window_start = 0, time.perf_counter()
                if save_now:
                    last_checkpoint = self._save(step, skipped, consecutive)
                if stop_now:
                    preempted = True
                    logger.message(f"stop requested ({stop.signal_name or 'another rank'}): checkpoint at step "
                                   f"{step} written, exiting; continue with --resume")
                    break
        if env.is_main and env.device.type != "cuda":  # CUDA: compiled under auto anyway (and not synchronised)
            record_run(self.compile_entry, env.device, step_seconds, compiled_from)
        summary = {"steps": step, "total_steps": self.total_steps, "skipped_steps": skipped,
                   "preempted": preempted, "global_batch_size": self.global_batch_size, "compiled": self.compiled,
                   "wall_time_s": time.perf_counter() - run_start,
                   "images_per_s": run_images / max(time.perf_counter() - run_start, 1e-9) if step > start_step else 0.0}
        if logger.rows:
            summary["final_loss"] = float(logger.rows[-1]["loss"])
        if getattr(self.loader, "skip_bad_images", False):
            summary["skipped_images"] = self.loader.skipped_images  # this rank's count
        summary = logger.close(summary)
        return TrainResult(step=step, total_steps=self.total_steps, skipped_steps=skipped, preempted=preempted,
                           checkpoint=last_checkpoint, summary=summary)
