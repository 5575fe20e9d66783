"""Snapshot and restore of everything a probe's trials touch, in place.

Parameters and buffers (non-persistent ones and BatchNorm running statistics
included), optimizer state and hyper-parameters, training flags and the RNG streams
(torch's CPU and CUDA, Python's, numpy's) are copied to host memory, so the snapshot
costs no device memory while trials measure it. Restoring writes the values back into
the *same* objects: a reference the user kept to a parameter, an optimizer state tensor
or a ``param_groups`` dict still sees the live value afterwards.
"""

from __future__ import annotations

import copy
import sys
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autoaccum.distributed import local_tensor
from autoaccum.step.rng import RngState

__all__ = ["TrainingState", "optimizer_hooks_off", "restore", "snapshot"]


def _host(value: Any) -> Any:
    """A host copy of ``value`` (tensors copied to the CPU, containers copied deeply)."""
    if isinstance(value, torch.Tensor):
        return local_tensor(value).detach().to("cpu", copy=True)
    return copy.deepcopy(value)


@torch.no_grad()
def _put_back(
    live: dict[Any, Any], saved: dict[Any, tuple[Any, Any]], keep: tuple[str, ...] = ()
) -> None:
    """Make ``live`` hold exactly ``saved``'s entries (and its ``keep`` keys); tensors are
    refilled in place."""
    for key in [k for k in live if k not in saved and k not in keep]:
        del live[key]
    for key, (original, value) in saved.items():
        if isinstance(original, torch.Tensor):
            local_tensor(original).copy_(value)
            live[key] = original
        else:
            live[key] = value


def _save(entries: dict[Any, Any], skip: tuple[str, ...] = ()) -> dict[Any, tuple[Any, Any]]:
    return {k: (v, _host(v)) for k, v in entries.items() if k not in skip}


@dataclass(frozen=True)
class TrainingState:
    tensors: dict[str, torch.Tensor]
    modes: dict[str, bool]
    #: per parameter: its state dict object and that dict's saved entries
    optimizer_state: list[tuple[torch.Tensor, dict[Any, Any], dict[Any, tuple[Any, Any]]]] | None
    optimizer_groups: list[dict[Any, tuple[Any, Any]]] | None
    rng: RngState


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    named: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters(remove_duplicate=True):
        named[f"param:{name}"] = param
    for name, buf in model.named_buffers(remove_duplicate=True):
        named[f"buffer:{name}"] = buf
    return named


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> TrainingState:
    """Copy the model's tensors, training flags, optimizer state and RNG states to the host."""
    return TrainingState(
        tensors={k: _host(v) for k, v in _named_tensors(model).items()},
        modes={name: m.training for name, m in model.named_modules()},
        optimizer_state=(
            [(p, st, _save(st)) for p, st in optimizer.state.items()]
            if optimizer is not None
            else None
        ),
        optimizer_groups=(
            [_save(g, skip=("params",)) for g in optimizer.param_groups]
            if optimizer is not None
            else None
        ),
        rng=RngState.capture(),
    )


@torch.no_grad()
def restore(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, state: TrainingState
) -> None:
    """Put back exactly what :func:`snapshot` saw, bit for bit and in place; gradients are
    cleared."""
    for name, tensor in _named_tensors(model).items():
        local_tensor(tensor).copy_(state.tensors[name])
    for name, module in model.named_modules():
        module.training = state.modes.get(name, module.training)
    model.zero_grad(set_to_none=True)
    if optimizer is not None and state.optimizer_state is not None:
        optimizer.zero_grad(set_to_none=True)
        known = {id(p) for p, _, _ in state.optimizer_state}
        for param in [p for p in optimizer.state if id(p) not in known]:
            del optimizer.state[param]  # state the trials created
        for param, entries, saved in state.optimizer_state:
            _put_back(entries, saved)
            optimizer.state[param] = entries
    if optimizer is not None and state.optimizer_groups is not None:
        for group, saved in zip(optimizer.param_groups, state.optimizer_groups, strict=True):
            _put_back(group, saved, keep=("params",))
    state.rng.restore()


def _hook_tables(optimizer: torch.optim.Optimizer) -> list[tuple[Any, str]]:
    """(owner, attribute) of every optimizer step hook table that would fire on ``optimizer``:
    its own (``register_step_pre_hook``/``post_hook``) and the global ones. torch keeps them
    in private attributes, so they are reached defensively."""
    module = sys.modules[torch.optim.Optimizer.__module__]
    owners: list[tuple[Any, str]] = [
        (optimizer, "_optimizer_step_pre_hooks"),
        (optimizer, "_optimizer_step_post_hooks"),
        (module, "_global_optimizer_pre_hooks"),
        (module, "_global_optimizer_post_hooks"),
    ]
    return [(o, a) for o, a in owners if isinstance(getattr(o, a, None), OrderedDict)]


@contextmanager
def optimizer_hooks_off(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Keep a probe's trial steps out of the user's optimizer step hooks (an EMA, a logger):
    trials are not training steps. The hooks are back when the block ends."""
    tables = _hook_tables(optimizer)
    saved = [getattr(owner, attr) for owner, attr in tables]
    for owner, attr in tables:
        setattr(owner, attr, OrderedDict())
    try:
        yield
    finally:
        for (owner, attr), table in zip(tables, saved, strict=True):
            setattr(owner, attr, table)
