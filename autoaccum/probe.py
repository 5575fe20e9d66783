"""probe(): find the largest micro-batch a model really trains with, leaving no trace.

A trial does what training will do: ``steps`` micro-steps of forward + backward
(so gradients are resident during the second forward), then a real
``optimizer.step()`` (so optimizer state exists), under the chosen precision, with
the batch tiled from real samples. Afterwards parameters, buffers, optimizer state,
training flags and RNG states are bit-identical to before, gradients are cleared,
and cached device memory is returned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from autoaccum.breakdown import fit_activation
from autoaccum.distributed import drop_unsynced_grads, fill_sharded_grads, gradient_sync
from autoaccum.errors import BatchError, ConfigError
from autoaccum.footprint import footprint
from autoaccum.losses import LossFn
from autoaccum.oom import free_memory
from autoaccum.plan import check_count
from autoaccum.precision import autocast, resolve_precision
from autoaccum.search import Agree, ProbeResult, search_max_batch
from autoaccum.state import restore, snapshot
from autoaccum.tree import batch_size, resize_batch, to_device

__all__ = [
    "DEFAULT_MARGIN",
    "Headroom",
    "apply_margin",
    "check_loss",
    "check_model_optimizer",
    "has_batchnorm",
    "probe",
]

#: Share of the device's memory :func:`probe` keeps spare at the chosen size (see
#: :func:`apply_margin`; a share of the samples where memory is not measured).
DEFAULT_MARGIN = 0.02


def _check_margin(margin: float) -> None:
    if not 0.0 <= margin < 0.5:
        raise ConfigError(
            f"margin must be in [0, 0.5), got {margin}; the default is {DEFAULT_MARGIN}"
        )


def apply_margin(
    max_batch: int,
    *,
    margin: float,
    hit_limit: bool,
    lower: int = 1,
    headroom: Headroom | None = None,
) -> int:
    """The micro-batch to train with: ``max_batch`` less what keeps ``margin`` spare.

    Why a margin at all: a size that passes a few trial steps in the probing process
    can still run out of memory in a long run started afresh. The caching allocator's
    layout differs (a fresh process fragments differently from one that has just
    freed larger trials), cuBLAS/cuDNN workspaces and autotuned kernels differ, and
    long runs see rare peaks. On the issue's H100 reference runs (torch 2.11) ResNet-50
    passed 1863 in-process and failed it fresh (1860 stable). Those variations scale
    with memory, so the margin is a share of the device's memory:

    * where the probe measured memory (``headroom``: CUDA), the size keeps at least
      ``margin`` of the device limit unreserved at its peak. ``max_batch`` is kept when
      its own peak already left that much; otherwise just enough samples are dropped
      (at least one), at the measured bytes per sample;
    * elsewhere, ``max(1, ⌈margin · max_batch⌉)`` samples are dropped, the same share
      counted in samples.

    No margin is taken when every size up to ``upper`` fitted: the size was not
    memory-bound.
    """
    _check_margin(margin)
    if not hit_limit or margin == 0.0:
        return max_batch
    if headroom is not None:
        wanted = margin * headroom.limit - (headroom.limit - headroom.peak)
        if wanted <= 0:
            return max_batch
        return max(lower, max_batch - max(1, math.ceil(wanted / headroom.per_sample)))
    return max(lower, max_batch - max(1, math.ceil(margin * max_batch)))


@dataclass(frozen=True)
class Headroom:
    """What the probe measured at its largest passing size, for :func:`apply_margin`."""

    limit: int  #: bytes the process may hold on the device
    peak: int  #: bytes reserved at the peak of the largest passing trial
    per_sample: float  #: bytes each sample adds (least squares over the passing trials)

    @classmethod
    def of(cls, found: ProbeResult) -> Headroom | None:
        """``None`` where memory was not measured or one size alone passed."""
        fit = fit_activation(found)
        top = [t for t in found.trials if t.fits and t.size == found.max_batch]
        if found.limit_bytes is None or fit is None or fit.per_sample <= 0 or not top:
            return None
        peak = top[-1].peak_reserved
        return None if peak is None else cls(found.limit_bytes, peak, fit.per_sample)


def has_batchnorm(model: nn.Module) -> bool:
    """True when ``model`` holds a BatchNorm layer (it cannot train on one sample)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def check_model_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """A clear error when the model cannot train or the optimizer holds none of its parameters."""
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if not trainable:
        raise ConfigError(
            f"{type(model).__name__} has no trainable parameters (none with requires_grad=True); "
            "there is nothing to train or probe. Unfreeze some parameters first"
        )
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not held & trainable:
        raise ConfigError(
            f"the optimizer ({type(optimizer).__name__}) holds none of the model's trainable "
            "parameters, so a step would not change the model. Build it from this model, "
            "e.g. torch.optim.AdamW(model.parameters()), after moving the model to its device"
        )


def check_loss(loss: object, where: str) -> torch.Tensor:
    """``loss`` if it is a scalar tensor that can be backpropagated, else a clear error."""
    if not isinstance(loss, torch.Tensor):
        raise ConfigError(
            f"loss_fn must return a scalar torch.Tensor, but it returned {type(loss).__name__} "
            f"({where})"
        )
    if loss.numel() != 1:
        raise ConfigError(
            f"loss_fn must return the mean loss over the micro-batch (a scalar), but it returned "
            f"a tensor of shape {tuple(loss.shape)} ({where}); reduce it with .mean()"
        )
    if not loss.requires_grad:
        raise ConfigError(
            f"the loss returned by loss_fn does not require grad ({where}): it was computed "
            "without the model's trainable parameters (under torch.no_grad(), or detached)"
        )
    return loss.reshape(())


def _model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def probe(
    model: nn.Module,
    batch: Any,
    *,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    upper: int,
    lower: int = 1,
    precision: str = "auto",
    margin: float = DEFAULT_MARGIN,
    device: torch.device | str | None = None,
    steps: int = 2,
    agree: Agree | None = None,
) -> ProbeResult:
    """The largest micro-batch in ``[lower, upper]`` that trains on ``model``'s device.

    ``batch`` holds real samples (any number ≥ 1); each trial tiles or slices them to
    its size along dim 0. ``loss_fn(model, batch)`` returns the mean loss. The model
    must already be on its device, ``optimizer`` built over its parameters.
    ``result.micro_batch`` is ``result.max_batch`` less the safety margin (see
    :func:`apply_margin`). A model with BatchNorm is never tried below 2 samples.
    """
    check_count("upper", upper)
    check_count("lower", lower)
    check_count("steps", steps)
    _check_margin(margin)  # before any work
    check_model_optimizer(model, optimizer)
    if not callable(loss_fn):
        raise ConfigError(f"loss_fn must be callable as loss_fn(model, batch); got {loss_fn!r}")
    if batch_size(batch) == 0:
        raise BatchError("the probe batch is empty: give at least one real sample to tile")
    dev = torch.device(device) if device is not None else _model_device(model)
    prec = resolve_precision(precision, dev)
    if has_batchnorm(model) and lower < 2:
        if upper < 2:
            raise ConfigError(
                "the model has BatchNorm, which cannot train on 1 sample, but upper is 1; "
                "raise upper (the per-rank target batch) to at least 2"
            )
        lower = 2

    def trial(size: int) -> None:
        micro = to_device(resize_batch(batch, size), dev)
        model.train()
        for _ in range(steps):
            with gradient_sync(model, enabled=False):
                with autocast(prec, dev):
                    loss = check_loss(loss_fn(model, micro), f"probe trial at micro-batch {size}")
                loss.backward()  # type: ignore[no-untyped-call]
            del loss
        fill_sharded_grads(model)
        optimizer.step()

    def cleanup() -> None:
        optimizer.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        drop_unsynced_grads(model)  # FSDP2 keeps no-sync gradients out of zero_grad's reach

    saved = snapshot(model, optimizer)
    try:
        found = search_max_batch(
            trial, upper, lower=lower, device=dev, agree=agree, cleanup=cleanup
        )
        # measured while the trials' optimizer state still exists: what training will hold
        fixed = footprint(model, optimizer)
    finally:
        restore(model, optimizer, saved)
        del saved
        free_memory(dev)
    chosen = apply_margin(
        found.max_batch,
        margin=margin,
        hit_limit=found.hit_limit,
        lower=lower,
        headroom=Headroom.of(found),
    )
    return replace(found, micro_batch=chosen, margin=margin, fixed_bytes=fixed)
