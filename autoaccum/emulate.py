"""Emulate a device with a small memory budget on the CPU (fault injection, not measurement).

The CPU allocator has no limit to hit, so a probe on the CPU never sees an
out-of-memory error. :class:`MemoryBudget` wraps a module and raises a real
``torch.OutOfMemoryError`` when the activations its forward saves for backward
(counted exactly with ``torch.autograd.graph.saved_tensors_hooks``), plus a fixed
amount, exceed a budget. It also brings its own memory meter (:meth:`autoaccum_meter`),
so a probe reads the emulated device as it reads a GPU: peaks per trial, the limit, and
a memory breakdown against the emulated budget rather than the host's RAM. The demo
uses it to show probing and accumulation on machines without a GPU; tests use it to
inject out-of-memory errors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from autoaccum.memory.meter import Reading
from autoaccum.step.oom import OOM_TYPE

__all__ = ["BudgetMeter", "MemoryBudget", "training_bytes"]


def training_bytes(model: nn.Module, moments: int = 2) -> int:
    """What training keeps resident besides activations: the parameters and buffers, a
    gradient per trainable parameter, and ``moments`` optimizer tensors per trainable
    parameter (AdamW keeps two; SGD with momentum one). A :class:`MemoryBudget`'s
    ``fixed_bytes`` for a model trained with that optimizer."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return params + buffers + (1 + moments) * trainable


class MemoryBudget(nn.Module):
    """``module`` on an emulated device of ``budget_bytes``, ``fixed_bytes`` of it taken.

    ``last_saved_bytes`` is the activation memory the last forward saved for backward
    (parameters excluded); ``peak_saved_bytes`` the most any forward saved since the meter
    last started.
    """

    def __init__(self, module: nn.Module, budget_bytes: int, fixed_bytes: int = 0) -> None:
        super().__init__()
        self.module = module
        self.budget_bytes = budget_bytes
        self.fixed_bytes = fixed_bytes
        self.last_saved_bytes = 0
        self.peak_saved_bytes = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        params = {p.data_ptr() for p in self.module.parameters()}
        saved = 0

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal saved
            if tensor.data_ptr() not in params:
                saved += tensor.numel() * tensor.element_size()
            # Detached: a saved output returned as itself would hold its own grad_fn in a
            # reference cycle, keeping every failed forward's activations alive until a
            # garbage collection.
            return tensor.detach()

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = self.module(*args, **kwargs)
        self.last_saved_bytes = saved
        self.peak_saved_bytes = max(self.peak_saved_bytes, saved)
        if torch.is_grad_enabled() and self.fixed_bytes + saved > self.budget_bytes:
            del out
            raise OOM_TYPE(
                f"emulated out of memory: {(self.fixed_bytes + saved) / 2**20:.2f} MiB needed "
                f"({saved / 2**20:.2f} MiB activations), budget {self.budget_bytes / 2**20:.2f} MiB"
            )
        return out

    def autoaccum_meter(self) -> BudgetMeter:
        """The meter a probe reads this emulated device with."""
        return BudgetMeter(self)


class BudgetMeter:
    """A :class:`~autoaccum.memory.meter.Meter` over a :class:`MemoryBudget`: the limit is
    the budget, a trial's peak the fixed bytes plus the most activations a forward saved."""

    def __init__(self, budget: MemoryBudget) -> None:
        self.budget = budget
        self.limit = budget.budget_bytes

    def start(self) -> None:
        self.budget.peak_saved_bytes = 0

    def stop(self) -> Reading:
        peak = self.budget.fixed_bytes + self.budget.peak_saved_bytes
        return Reading(peak_allocated=peak, peak_reserved=peak, alloc_retries=0)

    def allocated(self) -> int:
        return self.budget.fixed_bytes
