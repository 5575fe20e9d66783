"""What the distributed tests and their workers share beyond tests/reference.py."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from helpers import OOM, OOMAbove
from torch import nn

import autoaccum

WORLD = 2


def out_dir() -> Path:
    """The test's folder, where every rank saves what it saw (the worker's second argument)."""
    return Path(sys.argv[2])


def params(model: nn.Module) -> list[torch.Tensor]:
    """Full (unsharded) parameters, in the order of the unwrapped module."""
    out = []
    for p in model.parameters():
        full = getattr(p, "full_tensor", None)
        out.append((full() if callable(full) else p).detach().clone())
    return out


def summary(result: autoaccum.FitResult) -> dict[str, Any]:
    return {
        "losses": list(result.losses),
        "samples_seen": result.samples_seen,
        "optimizer_steps": result.optimizer_steps,
        "micro_sizes": result.plan.micro_sizes,
        "world_size": result.plan.world_size,
        "probe": result.probe.to_dict() if result.probe is not None else None,
    }


def bn_mlp(limit: int = 10**9, seed: int = 0) -> nn.Sequential:
    """Like ``helpers.mlp`` with a BatchNorm: DDP broadcasts its buffers on every forward."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), OOMAbove(limit), nn.Linear(8, 3)
    ).double()


class _BackwardFault(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, faults: Faults) -> torch.Tensor:  # type: ignore[override]
        ctx.faults = faults
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        faults = ctx.faults
        faults.backward_calls += 1
        if faults.backward_calls in faults.backwards:
            calls = faults.backward_calls
            raise OOM(
                f"CUDA out of memory. Tried to allocate 2.00 MiB (injected, backward {calls})"
            )
        return grad, None


class Faults(nn.Module):
    """Identity that raises a real ``torch.OutOfMemoryError`` in chosen training forwards and
    backwards of this rank, numbered from 1 in the order they run."""

    def __init__(self, forwards: tuple[int, ...] = (), backwards: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.forwards = set(forwards)
        self.backwards = set(backwards)
        self.forward_calls = 0
        self.backward_calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return x
        self.forward_calls += 1
        if self.forward_calls in self.forwards:
            calls = self.forward_calls
            raise OOM(f"CUDA out of memory. Tried to allocate 2.00 MiB (injected, forward {calls})")
        return _BackwardFault.apply(x, self)


def faulty_mlp(faults: Faults, seed: int = 0) -> nn.Sequential:
    """``helpers.mlp`` with fault injection after the first layer."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), faults, nn.Linear(8, 3)).double()
