"""probe(): find the largest micro-batch a model really trains with, leaving no trace.

A trial does what training will do: ``steps`` micro-steps of forward + backward
(so gradients are resident during the second forward), then a real
``optimizer.step()`` (so optimizer state exists), under the chosen precision, with
the batch tiled from real samples. Afterwards parameters, buffers, optimizer state,
training flags and RNG states are bit-identical to before, gradients are cleared,
and cached device memory is returned.

The pieces, each in its module: :mod:`~autoaccum.probing.oom` (what an out-of-memory
error looks like), :mod:`~autoaccum.probing.device` (the device and its memory
readings), :mod:`~autoaccum.probing.search` (which sizes to try),
:mod:`~autoaccum.probing.peaks` (pure arithmetic on the readings: the peak line, the
margin) and :mod:`~autoaccum.probing.state` (snapshot and restore).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from autoaccum.distributed import drop_unsynced_grads, fill_sharded_grads, gradient_sync
from autoaccum.errors import BatchError, ConfigError, check_callable, check_count
from autoaccum.memory.footprint import footprint
from autoaccum.probing.device import Meter, meter_for
from autoaccum.probing.oom import free_memory
from autoaccum.probing.peaks import DEFAULT_MARGIN, TopReading, apply_margin, check_margin
from autoaccum.probing.search import Agree, search_max_batch
from autoaccum.probing.state import optimizer_hooks_off, restore, snapshot
from autoaccum.results import ProbeResult
from autoaccum.train.batches import batch_size, resize_batch, to_device
from autoaccum.train.losses import LossFn, check_loss
from autoaccum.train.model import check_model, check_model_optimizer, min_micro, model_device
from autoaccum.train.precision import autocast, resolve_precision

__all__ = ["DEFAULT_MARGIN", "probe"]


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
    meter: Meter | None = None,
) -> ProbeResult:
    """The largest micro-batch in ``[lower, upper]`` that trains on ``model``'s device.

    ``batch`` holds real samples (any number ≥ 1); each trial tiles or slices them to
    its size along dim 0. ``loss_fn(model, batch)`` returns the mean loss. The model
    must already be on its device, ``optimizer`` built over its parameters.
    ``result.max_micro`` is ``result.largest_pass`` less the safety margin (see
    :func:`~autoaccum.probing.peaks.apply_margin`). A model with BatchNorm is never tried
    below 2 samples. ``meter`` reads the device's memory (default:
    :func:`~autoaccum.probing.device.meter_for`: the CUDA allocator on a CUDA device, an
    emulated device's own meter, nothing elsewhere).
    """
    check_count("upper", upper)
    check_count("lower", lower)
    check_count("steps", steps)
    check_margin(margin)  # before any work
    check_model(model)
    check_model_optimizer(model, optimizer)
    check_callable("loss_fn", loss_fn, "loss_fn(model, batch) -> mean loss")
    if batch_size(batch) == 0:
        raise BatchError("the probe batch is empty: give at least one real sample to tile")
    dev = torch.device(device) if device is not None else model_device(model)
    prec = resolve_precision(precision, dev)
    smallest = min_micro(model)
    if lower < smallest:
        if upper < smallest:
            raise ConfigError(
                "the model has BatchNorm, which cannot train on 1 sample, but upper is 1; "
                "raise upper (the per-rank target batch) to at least 2"
            )
        lower = smallest

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

    if meter is None:
        meter = meter_for(dev, model)
    saved = snapshot(model, optimizer)
    try:
        with optimizer_hooks_off(optimizer):
            found = search_max_batch(
                trial, upper, lower=lower, device=dev, agree=agree, cleanup=cleanup, meter=meter
            )
        # measured while the trials' optimizer state still exists: what training will hold
        fixed = footprint(model, optimizer)
    finally:
        restore(model, optimizer, saved)
        del saved
        free_memory(dev)
    ceiling = apply_margin(
        found.largest_pass,
        margin=margin,
        hit_limit=found.hit_limit,
        lower=lower,
        top=TopReading.of(found.trials, found.largest_pass, found.limit_bytes),
    )
    return replace(found, max_micro=ceiling, margin=margin, fixed_bytes=fixed)
