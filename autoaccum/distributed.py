"""Rank helpers. Every function is a no-op (or the identity) without a process group."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from autoaccum.errors import DistributedError

__all__ = [
    "DistInfo",
    "all_reduce_max",
    "all_reduce_min",
    "all_reduce_sum",
    "current",
    "gradient_sync",
    "init_from_env",
    "is_fsdp2",
    "unwrap",
    "wrap_model",
]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank, world size, and the collective's tensor device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def active(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def comm_device(self) -> torch.device:
        """The device of tensors handed to collectives (NCCL needs CUDA tensors)."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


def _torchrun_env() -> bool:
    return all(name in os.environ for name in _TORCHRUN_VARS)


def init_from_env(device_type: str | None = None) -> bool:
    """Initialise the default process group from torchrun's variables; True if it did.

    Nothing happens when a group already exists or the variables are absent. The
    backend is NCCL for CUDA devices, gloo otherwise.
    """
    if not dist.is_available() or dist.is_initialized() or not _torchrun_env():
        return False
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend=backend)
    except Exception as exc:
        raise DistributedError(
            f"could not initialise the {backend} process group from torchrun's environment "
            f"(RANK={os.environ.get('RANK')}, WORLD_SIZE={os.environ.get('WORLD_SIZE')}, "
            f"MASTER_ADDR={os.environ.get('MASTER_ADDR')}, "
            f"MASTER_PORT={os.environ.get('MASTER_PORT')}): {exc}. Check that every rank was "
            "launched with the same rendezvous settings, or call "
            "torch.distributed.init_process_group() yourself before autoaccum.fit()"
        ) from exc
    return True


def current() -> DistInfo:
    """This process's rank and world size; rank 0 of 1 without a process group."""
    if not dist.is_available() or not dist.is_initialized():
        return DistInfo()
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        backend=str(dist.get_backend()),
    )


def _reduce(value: float, op: dist.ReduceOp.RedOpType, info: DistInfo) -> float:
    if not info.active or info.world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=info.comm_device)
    dist.all_reduce(tensor, op=op)
    return float(tensor.item())


def all_reduce_max(value: float, info: DistInfo) -> float:
    return _reduce(value, dist.ReduceOp.MAX, info)


def all_reduce_min(value: float, info: DistInfo) -> float:
    return _reduce(value, dist.ReduceOp.MIN, info)


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (moved to the collective's device and back)."""
    if not info.active or info.world_size == 1:
        return tensor
    buffer = tensor.to(info.comm_device)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    tensor.copy_(buffer)
    return tensor


def is_fsdp2(model: nn.Module) -> bool:
    """True for a module sharded with FSDP2's ``fully_shard``."""
    return hasattr(model, "set_requires_gradient_sync") and hasattr(model, "reshard")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DistributedDataParallel wrapper (or the module itself)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DDP-wrap a plain model for a multi-rank run; DDP and FSDP2 models are used as they are."""
    if not info.active:
        return model
    if isinstance(model, nn.parallel.DistributedDataParallel) or is_fsdp2(model):
        return model
    device_ids = [device.index if device.index is not None else 0] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Run a micro-step with or without the gradient all-reduce of DDP / FSDP2.

    All micro-steps of a window but the last run with ``enabled=False``, so a window
    costs exactly one gradient reduction. A plain module ignores this.
    """
    if enabled:
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif is_fsdp2(model):
        model.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)  # type: ignore[operator]
    else:
        yield
