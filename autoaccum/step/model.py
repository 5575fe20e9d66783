"""What autoaccum needs to know about the user's model and optimizer, checked up front."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from autoaccum.errors import ConfigError

__all__ = [
    "check_model",
    "check_model_optimizer",
    "default_optimizer",
    "has_batchnorm",
    "min_micro",
    "model_device",
    "train_mode",
    "warn_outside_optimizer",
]


def check_model(model: object) -> nn.Module:
    """``model`` when it is an ``nn.Module`` with trainable parameters, else a clear error."""
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model must be a torch.nn.Module, got {type(model).__name__}; wrap a function in "
            "an nn.Module subclass whose forward calls it"
        )
    if any(p.is_meta for p in model.parameters()) or any(b.is_meta for b in model.buffers()):
        raise ConfigError(
            f"{type(model).__name__} has tensors on the 'meta' device, which hold no data: "
            "materialise the model first (model.to_empty(device=...) and initialise it, or "
            "load a state dict with load_state_dict(..., assign=True))"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(
            f"{type(model).__name__} has no trainable parameters (none with requires_grad=True); "
            "there is nothing to train or probe. Unfreeze some parameters first"
        )
    return model


def default_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW over the model's trainable parameters: the default of ``fit`` and ``probe``."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])


def check_model_optimizer(model: nn.Module, optimizer: object) -> torch.optim.Optimizer:
    """``optimizer`` when it is an optimizer over some of the model's trainable parameters."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            f"optimizer must be a torch.optim.Optimizer (or None for AdamW), got "
            f"{type(optimizer).__name__} {optimizer!r}; build one, e.g. "
            "torch.optim.AdamW(model.parameters(), lr=3e-4)"
        )
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ConfigError(
            "LBFGS re-evaluates the loss through a closure several times per step, which a window "
            "of accumulated micro-batches cannot do; use an optimizer that steps on the "
            "gradient (SGD, AdamW, …)"
        )
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not held & trainable:
        raise ConfigError(
            f"the optimizer ({type(optimizer).__name__}) holds none of the model's trainable "
            "parameters, so a step would not change the model. Build it from this model, "
            "e.g. torch.optim.AdamW(model.parameters()), after moving the model to its device"
        )
    return optimizer


def warn_outside_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """One warning naming the model's trainable parameters that ``optimizer`` does not hold:
    they get gradients every window but are never updated (a frozen-body phase whose
    parameters were left trainable, say). Their gradients are cleared every window."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    outside = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if not outside:
        return
    listed = ", ".join(outside[:5]) + (f" and {len(outside) - 5} more" if len(outside) > 5 else "")
    warnings.warn(
        f"{len(outside)} trainable parameter(s) of {type(model).__name__} are not in the "
        f"optimizer ({listed}): they get gradients but are never updated. Freeze them "
        "(requires_grad_(False)) or add them to the optimizer",
        UserWarning,
        stacklevel=4,
    )


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without any)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def has_batchnorm(model: nn.Module) -> bool:
    """True when ``model`` holds a BatchNorm layer (it cannot train on one sample)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def min_micro(model: nn.Module) -> int:
    """The smallest micro-batch ``model`` can train on: 2 with BatchNorm, else 1."""
    return 2 if has_batchnorm(model) else 1


@contextmanager
def train_mode(model: nn.Module) -> Iterator[None]:
    """Run a block with ``model`` in training mode; every module's own flag is put back after
    (a model handed over in ``eval()`` is trained in train mode and returned in eval mode)."""
    modes = [(m, m.training) for m in model.modules()]
    model.train()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
