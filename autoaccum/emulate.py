"""Emulate a device with a small memory budget on the CPU (fault injection, not measurement).

The CPU allocator has no limit to hit, so a probe on the CPU never sees an
out-of-memory error. :class:`MemoryBudget` wraps a module and raises a real
``torch.OutOfMemoryError`` when the activations its forward saves for backward
(counted exactly with ``torch.autograd.graph.saved_tensors_hooks``), plus a fixed
amount, exceed a budget. The demo uses it to show probing and accumulation on
machines without a GPU; tests use it to inject out-of-memory errors.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["MemoryBudget"]

_OOM: type[Exception] = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class MemoryBudget(nn.Module):
    """``module`` on an emulated device of ``budget_bytes``, ``fixed_bytes`` of it taken.

    ``last_saved_bytes`` is the activation memory the last forward saved for backward
    (parameters excluded).
    """

    def __init__(self, module: nn.Module, budget_bytes: int, fixed_bytes: int = 0) -> None:
        super().__init__()
        self.module = module
        self.budget_bytes = budget_bytes
        self.fixed_bytes = fixed_bytes
        self.last_saved_bytes = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        params = {p.data_ptr() for p in self.module.parameters()}
        saved = 0

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            nonlocal saved
            if tensor.data_ptr() not in params:
                saved += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = self.module(*args, **kwargs)
        self.last_saved_bytes = saved
        if torch.is_grad_enabled() and self.fixed_bytes + saved > self.budget_bytes:
            del out
            raise _OOM(
                f"emulated out of memory: {(self.fixed_bytes + saved) / 2**20:.2f} MiB needed "
                f"({saved / 2**20:.2f} MiB activations), budget {self.budget_bytes / 2**20:.2f} MiB"
            )
        return out
