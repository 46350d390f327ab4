"""torch.distributed set-up for torchrun (NCCL on GPU, gloo on CPU) and small collective helpers,
each a no-op / identity in a single process."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from fastkd.checks import check_choice


@dataclass(frozen=True)
class DistEnv:
    """Where this process runs: ``rank`` of ``world_size`` processes, ``local_rank`` on its node,
    and the ``device`` it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> ``cuda`` when available else ``cpu``; ``"cpu"`` / ``"cuda"`` as given."""
    check_choice("device", device, ("auto", "cpu", "cuda"))
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but no CUDA device is available")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def init_distributed(device: str = "auto", *, timeout_minutes: float = 30.0) -> DistEnv:
    """Initialise the default process group from torchrun's environment (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): NCCL on CUDA, gloo on CPU. Without those
    variables (or with ``WORLD_SIZE=1``) no group is created and a single-process env is returned."""
    target = resolve_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world_size}")
    if target.type == "cuda":
        target = torch.device("cuda", local_rank)
        torch.cuda.set_device(target)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if target.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                timeout=timedelta(minutes=timeout_minutes))
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=target)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


_HOST_GROUPS: dict = {}


def host_group():
    """A gloo group over every rank for host-side flags (``None``: the default group, when it is
    gloo already). Created on first use, which every rank reaches at the same point."""
    if dist.get_backend() == "gloo":
        return None
    key = id(dist.group.WORLD)
    if key not in _HOST_GROUPS:
        _HOST_GROUPS[key] = dist.new_group(backend="gloo")
    return _HOST_GROUPS[key]


def any_across_ranks(flag: bool | torch.Tensor, device: torch.device) -> bool:
    """True when ``flag`` (a bool or a device bool tensor) is true on at least one rank (all ranks
    get the same answer). A bool is all-reduced on the CPU (:func:`host_group`): it never waits for
    the GPU; a device tensor is read by the host after its all-reduce."""
    if world_size() == 1:
        return bool(flag)
    if isinstance(flag, torch.Tensor):
        value = flag.to(device=device, dtype=torch.float32).reshape(1)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    else:
        value = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=host_group())
    return bool(value.item() > 0)


def max_across_ranks_(value: torch.Tensor) -> torch.Tensor:
    """``value`` all-reduced (max) across ranks in place and returned; the host does not read it
    (on GPU the all-reduce is queued on the device like any kernel)."""
    if world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def mean_across_ranks(values: dict, device: torch.device) -> dict:
    """``{name: float}`` averaged over ranks (every rank must pass the same names)."""
    if world_size() == 1 or not values:
        return dict(values)
    names = sorted(values)
    tensor = torch.tensor([float(values[n]) for n in names], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return {name: float(v) / world_size() for name, v in zip(names, tensor.tolist())}


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def shutdown() -> None:
    """Destroy the default process group if one was created."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
