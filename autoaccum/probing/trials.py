"""probe(): find the largest micro-batch a model really trains with, leaving no trace.

A trial does what training will do: ``steps`` micro-steps of forward + backward
(so gradients are resident during the second forward), then a real
``optimizer.step()`` (so optimizer state exists), under the chosen precision, with
the batch tiled from real samples. Afterwards parameters, buffers, optimizer state,
training flags and RNG states are bit-identical to before, gradients are cleared,
and cached device memory is returned.

"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from autoaccum.device import check_device
from autoaccum.distributed import drop_unsynced_grads, fill_sharded_grads, gradient_sync
from autoaccum.errors import BatchError, ConfigError, check_count
from autoaccum.memory.footprint import footprint
from autoaccum.probing.fastest import check_choose, time_and_choose
from autoaccum.probing.host import SavedBytes, host_available, host_ceiling
from autoaccum.probing.meter import Meter, meter_for
from autoaccum.probing.oom import free_memory
from autoaccum.probing.peaks import DEFAULT_MARGIN, TopReading, apply_margin, check_margin
from autoaccum.probing.search import Agree, search_max_batch
from autoaccum.probing.state import optimizer_hooks_off, restore, snapshot
from autoaccum.results import ProbeResult
from autoaccum.train.batches import batch_size, resize_batch, to_device
from autoaccum.train.counting import resolve_loss
from autoaccum.train.losses import LossFn, check_loss
from autoaccum.train.model import (
    check_model,
    check_model_optimizer,
    default_optimizer,
    min_micro,
    model_device,
)
from autoaccum.train.precision import autocast, resolve_precision

__all__ = ["DEFAULT_MARGIN", "probe"]


def probe(
    model: nn.Module,
    batch: Any,
    *,
    loss_fn: LossFn | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    upper: int,
    lower: int = 1,
    precision: str = "auto",
    margin: float = DEFAULT_MARGIN,
    device: torch.device | str | None = None,
    steps: int = 2,
    agree: Agree | None = None,
    meter: Meter | None = None,
    choose: str = "largest",
    slowest: Callable[[float], float] | None = None,
) -> ProbeResult:
    """The largest micro-batch in ``[lower, upper]`` that trains on ``model``'s device.

    ``batch`` holds real samples (any number ≥ 1); each trial tiles or slices them to
    its size along dim 0. ``loss_fn(model, batch)`` returns the mean loss (default: as for
    ``fit``). The model must already be on its device, ``optimizer`` built over its
    parameters (default: AdamW, as for ``fit``).
    ``result.max_micro`` is ``result.largest_pass`` less the safety margin (see
    :func:`~autoaccum.probing.peaks.apply_margin`). A model with BatchNorm is never tried
    below 2 samples. ``meter`` reads the device's memory (default:
    :func:`~autoaccum.probing.meter.meter_for`: the CUDA allocator on a CUDA device, an
    emulated device's own meter, nothing elsewhere).

    ``choose`` picks the micro-batch under that ceiling: ``"largest"``, or ``"fastest"``
    (the few candidate sizes are timed, and the plan with the most samples/s wins, the
    smaller size within 1 %; see :mod:`~autoaccum.probing.choose`); ``"auto"`` is fastest
    where memory is measured on a GPU, largest elsewhere (and on several ranks, whose ceilings
    agree only after the probe). ``slowest`` makes timings agree (their maximum).
    """
    check_count("upper", upper)
    check_count("lower", lower)
    check_count("steps", steps)
    check_margin(margin)  # before any work
    choose = check_choose(choose)
    check_model(model)
    optimizer = check_model_optimizer(
        model, optimizer if optimizer is not None else default_optimizer(model)
    )
    loss_fn, _ = resolve_loss(loss_fn, None)  # a loss module too: criterion(model(x), y)
    if batch_size(batch) == 0:
        raise BatchError("the probe batch is empty: give at least one real sample to tile")
    dev = check_device(device) if device is not None else model_device(model)
    prec = resolve_precision(precision, dev)
    smallest = min_micro(model)
    if lower < smallest:
        if upper < smallest:
            raise ConfigError(
                "the model has BatchNorm, which cannot train on 1 sample, but upper is 1; "
                "raise upper (the per-rank target batch) to at least 2"
            )
        lower = smallest

    if meter is None:
        meter = meter_for(dev, model)
    on_host = meter is None and dev.type == "cpu" and agree is None
    measured: list[float] = []  # the first trial's saved activations per sample (on the host)
    host: list[str] = []

    def forward_backward(micro: Any, where: str) -> None:
        """One micro-step as training runs it: no gradient sync, the loss checked."""
        with gradient_sync(model, enabled=False):
            with autocast(prec, dev):
                loss = check_loss(loss_fn(model, micro), where)
            loss.backward()  # type: ignore[no-untyped-call]

    def trial(size: int) -> None:
        micro = to_device(resize_batch(batch, size), dev)
        model.train()
        for _ in range(steps):
            with SavedBytes(model) if on_host and not measured else nullcontext() as saved:
                forward_backward(micro, f"probe trial at micro-batch {size}")
            if saved is not None:
                measured.append(saved.total / size)
        fill_sharded_grads(model)
        optimizer.step()

    def first() -> int:
        ceiling, why = host_ceiling(
            upper, saved_per_sample=max(measured), available=host_available(), margin=margin
        )
        host.append(why)
        return ceiling

    def cleanup() -> None:
        optimizer.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        drop_unsynced_grads(model)  # FSDP2 keeps no-sync gradients out of zero_grad's reach

    chosen = ""
    saved = snapshot(model, optimizer)
    try:
        with optimizer_hooks_off(optimizer):
            found = search_max_batch(
                trial,
                upper,
                lower=lower,
                device=dev,
                agree=agree,
                cleanup=cleanup,
                meter=meter,
                first=first if on_host else None,
            )
        # measured while the trials' optimizer state still exists: what training will hold
        fixed = footprint(model, optimizer)
        ceiling = apply_margin(
            found.largest_pass,
            margin=margin,
            hit_limit=found.hit_limit,
            lower=lower,
            top=TopReading.of(found.trials, found.largest_pass, found.limit_bytes),
        )
        measured_gpu = meter is not None and dev.type == "cuda"
        wanted = choose == "fastest" or (choose == "auto" and measured_gpu)
        if wanted and agree is not None:  # ranks' ceilings differ until agreed: time alone
            host.append("choose='fastest' times one process; with several ranks the largest plan")
        elif wanted:

            def micro_step(size: int) -> None:
                micro = to_device(resize_batch(batch, size), dev)
                forward_backward(micro, f"timing micro-batch {size}")

            choice = time_and_choose(
                per_rank=upper,
                ceiling=ceiling,
                min_micro=smallest,
                micro_step=micro_step,
                optimizer_step=optimizer.step,
                cleanup=cleanup,
                sync=lambda: torch.cuda.synchronize(dev) if dev.type == "cuda" else None,
                slowest=slowest if slowest is not None else (lambda s: s),
                device=dev,
            )
            if choice is not None:
                ceiling, chosen = choice.plan.micro_batch, choice.reason
    finally:
        restore(model, optimizer, saved)
        del saved
        free_memory(dev)
    return replace(
        found, max_micro=ceiling, margin=margin, fixed_bytes=fixed, notes=tuple(host), choice=chosen
    )
