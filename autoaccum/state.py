"""Snapshot and restore of everything a probe's trials touch.

Parameters and buffers (non-persistent ones and BatchNorm running statistics
included), optimizer state, training flags and RNG states are copied to host
memory, so the snapshot costs no device memory while trials measure it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autoaccum.oom import cuda_initialized

__all__ = ["TrainingState", "local_tensor", "preserved_rng", "restore", "snapshot"]


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor a rank really holds (the local shard of an FSDP2 DTensor)."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def _to_host(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return local_tensor(obj).detach().to("cpu", copy=True)
    if isinstance(obj, Mapping):
        return {k: _to_host(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_host(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_host(v) for v in obj)
    return obj


@dataclass(frozen=True)
class TrainingState:
    tensors: dict[str, torch.Tensor]
    modes: dict[str, bool]
    optimizer: dict[str, Any] | None
    cpu_rng: torch.Tensor
    cuda_rng: list[torch.Tensor] | None
    python_rng: object


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    named: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters(remove_duplicate=True):
        named[f"param:{name}"] = param
    for name, buf in model.named_buffers(remove_duplicate=True):
        named[f"buffer:{name}"] = buf
    return named


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> TrainingState:
    """Copy the model's tensors, training flags, optimizer state and RNG states to the host."""
    cuda_rng = torch.cuda.get_rng_state_all() if cuda_initialized() else None
    return TrainingState(
        tensors={k: _to_host(v) for k, v in _named_tensors(model).items()},
        modes={name: m.training for name, m in model.named_modules()},
        optimizer=_to_host(optimizer.state_dict()) if optimizer is not None else None,
        cpu_rng=torch.get_rng_state(),
        cuda_rng=cuda_rng,
        python_rng=random.getstate(),
    )


@torch.no_grad()
def restore(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, state: TrainingState
) -> None:
    """Put back exactly what :func:`snapshot` saw, bit for bit; gradients are cleared."""
    for name, tensor in _named_tensors(model).items():
        local_tensor(tensor).copy_(state.tensors[name])
    for name, module in model.named_modules():
        module.training = state.modes.get(name, module.training)
    model.zero_grad(set_to_none=True)
    if optimizer is not None and state.optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
        optimizer.load_state_dict(state.optimizer)
    torch.set_rng_state(state.cpu_rng)
    if state.cuda_rng is not None:
        torch.cuda.set_rng_state_all(state.cuda_rng)
    random.setstate(state.python_rng)  # type: ignore[arg-type]


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block without disturbing torch's (CPU and CUDA) and Python's RNG streams."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if cuda_initialized() else None
    py = random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(py)
