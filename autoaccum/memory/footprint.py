"""The fixed memory of training, measured from the real tensors: parameters, buffers,
gradients and optimizer state."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from autoaccum.distributed import local_tensor

__all__ = ["footprint"]


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def _count_bytes(tensors: Iterable[torch.Tensor], seen: set[tuple[str, int]]) -> int:
    """Bytes of the storages behind ``tensors``, each storage counted once across calls."""
    total = 0
    for tensor in tensors:
        local = local_tensor(tensor)
        try:
            storage = local.untyped_storage()
            key = (str(local.device), storage.data_ptr())
            nbytes = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (some subclasses)
            key, nbytes = (str(local.device), 0), local.nelement() * local.element_size()
        if key[1] == 0:  # meta or empty tensors share data_ptr 0: count each one
            key = ("id", id(local))
            nbytes = local.nelement() * local.element_size()
        if key in seen:
            continue
        seen.add(key)
        total += nbytes
    return total


def footprint(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes of the fixed (batch-independent) tensors of training, measured from the tensors.

    Keys: ``parameters``, ``buffers``, ``optimizer_state`` and either ``gradients`` (the
    ``.grad`` tensors that exist now) or, when no parameter has a gradient yet,
    ``gradients_expected`` (the bytes of the trainable parameters: what backward will
    allocate). Storage shared between tensors (tied weights, views, a flat buffer) is
    counted once, in the first key that meets it, so ``sum(footprint(...).values())`` is
    the fixed memory. Optimizer state is measured as it is now: an optimizer that creates
    its state lazily (Adam) has none before its first step.
    """
    seen: set[tuple[str, int]] = set()
    params = list(model.parameters())
    result = {
        "parameters": _count_bytes(params, seen),
        "buffers": _count_bytes(model.buffers(), seen),
    }
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        result["gradients"] = _count_bytes(grads, seen)
    else:
        trainable = [p for p in params if p.requires_grad]
        result["gradients_expected"] = sum(
            local_tensor(p).nelement() * local_tensor(p).element_size() for p in trainable
        )
    state = optimizer.state.values() if optimizer is not None else ()
    result["optimizer_state"] = _count_bytes(_tensors(list(state)), seen)
    return result
