"""probe(): find the largest micro-batch a model really trains with, leaving no trace.

A trial does what training will do: ``micro_steps`` micro-steps of forward + backward
(so gradients are resident during the second forward), then a real
``optimizer.step()`` (so optimizer state exists), under the chosen precision, with
the batch tiled from real samples. Afterwards parameters, buffers, optimizer state,
training flags and RNG states are bit-identical to before, gradients are cleared,
and cached device memory is returned.

"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from autoaccum.device import check_device
from autoaccum.distributed import drop_unsynced_grads, fill_sharded_grads, gradient_sync
from autoaccum.errors import BatchError, ConfigError, check_count
from autoaccum.memory.footprint import footprint
from autoaccum.memory.host import SavedBytes, host_available, host_ceiling
from autoaccum.memory.meter import Meter, meter_for
from autoaccum.memory.peaks import DEFAULT_MARGIN, TopReading, apply_margin, check_margin
from autoaccum.probing.fastest import check_choose, time_and_choose
from autoaccum.probing.search import search_max_batch
from autoaccum.probing.state import optimizer_hooks_off, restore, snapshot
from autoaccum.results import ProbeResult
from autoaccum.step.batches import batch_size, resize_batch, to_device
from autoaccum.step.counting import resolve_loss
from autoaccum.step.losses import LossFn, check_loss
from autoaccum.step.model import (
    check_model,
    check_model_optimizer,
    default_optimizer,
    min_micro,
    model_device,
)
from autoaccum.step.oom import free_memory
from autoaccum.step.precision import autocast, resolve_precision
from autoaccum.step.ranks import Ranks

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
    micro_steps: int = 2,
    ranks: Ranks | None = None,
    meter: Meter | None = None,
    choose: str = "auto",
    forward_only: bool = False,
) -> ProbeResult:
    """The largest micro-batch in ``[lower, upper]`` that trains on ``model``'s device.

    ``batch`` holds real samples (any number ≥ 1); each trial tiles or slices them to
    its size along dim 0. ``loss_fn(model, batch)`` returns the mean loss (default: as for
    ``fit``; a loss module too). The model must already be on its device, ``optimizer`` built
    over its parameters (default: AdamW, as for ``fit``).
    ``result.max_micro`` is ``result.largest_pass`` less the safety margin (see
    :func:`~autoaccum.memory.peaks.apply_margin`). A model with BatchNorm is never tried
    below 2 samples. ``meter`` reads the device's memory (default:
    :func:`~autoaccum.memory.meter.meter_for`: the CUDA allocator on a CUDA device, an
    emulated device's own meter, nothing elsewhere).

    ``choose`` picks the micro-batch under that ceiling, as ``result.chosen``: ``"fastest"``
    (the few candidate sizes are timed, and the plan with the most samples/s wins, the
    smaller size within 1 %; see :mod:`~autoaccum.probing.choose`), ``"largest"`` (none
    picked: the ceiling itself), or ``"auto"`` (the default): fastest where memory is
    measured on a GPU, largest elsewhere and on several ranks.

    ``ranks`` (:class:`~autoaccum.step.ranks.Ranks`): every rank probes at once, the ranks
    agree on every trial (a size that ran out of memory on one rank failed on all) and
    ``max_micro`` is the smallest ceiling of any rank; a rank that fails otherwise stops
    every rank. Without it, this process alone. ``forward_only``: the trials are forward
    passes without gradients (an evaluation's micro-batch); no optimizer takes part.
    """
    check_count("upper", upper)
    check_count("lower", lower)
    check_count("micro_steps", micro_steps)
    check_margin(margin)  # before any work
    choose = check_choose(choose)
    check_model(model)
    if not forward_only:
        optimizer = check_model_optimizer(
            model, optimizer if optimizer is not None else default_optimizer(model)
        )
    loss_fn, _ = resolve_loss(loss_fn, None)  # a loss module too: criterion(model(x), y)
    if batch_size(batch) == 0:
        raise BatchError("the probe batch is empty: give at least one real sample to tile")
    dev = check_device(device) if device is not None else model_device(model)
    prec = resolve_precision(precision, dev)
    smallest = 1 if forward_only else min_micro(model)
    if lower < smallest:
        if upper < smallest:
            raise ConfigError(
                "the model has BatchNorm, which cannot train on 1 sample, but upper is 1; "
                "raise upper (the per-rank target batch) to at least 2"
            )
        lower = smallest
    multi = ranks if ranks is not None and ranks.multi else None

    def search() -> ProbeResult:
        return _probe(
            model,
            batch,
            loss_fn,
            optimizer,
            upper,
            lower,
            prec,
            margin,
            dev,
            micro_steps,
            multi,
            meter,
            choose,
            forward_only,
        )

    if multi is None:
        return search()
    point = "probing the micro-batch"
    found = multi.run(search, point)
    agreed = multi.minimum(point, found.max_micro, point)
    note = (
        f"the smallest ceiling of {multi.size} ranks: {agreed}" if agreed < found.max_micro else ""
    )
    notes = (*found.notes, note) if note else found.notes
    return replace(found, max_micro=agreed, notes=notes)


def _probe(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer | None,
    upper: int,
    lower: int,
    prec: str,
    margin: float,
    dev: torch.device,
    micro_steps: int,
    ranks: Ranks | None,
    meter: Meter | None,
    choose: str,
    forward_only: bool,
) -> ProbeResult:
    """:func:`probe` once the arguments are checked (this rank's search)."""
    if meter is None:
        meter = meter_for(dev, model)
    on_host = meter is None and dev.type == "cpu" and ranks is None
    measured: list[float] = []  # the first trial's saved activations per sample (on the host)
    host: list[str] = []

    def agree(failed: bool) -> bool:
        assert ranks is not None  # only passed with several ranks
        return ranks.agree("probing the micro-batch", oom=failed).oom > 0

    def forward_backward(micro: Any, where: str) -> None:
        """One micro-step as training runs it: no gradient sync, the loss checked."""
        with gradient_sync(model, enabled=False):
            with autocast(prec, dev):
                loss = check_loss(loss_fn(model, micro), where)
            loss.backward()  # type: ignore[no-untyped-call]

    def trial(size: int) -> None:
        micro = to_device(resize_batch(batch, size), dev)
        if forward_only:
            with torch.no_grad(), autocast(prec, dev):
                loss_fn(model, micro)
            return
        assert optimizer is not None  # checked by probe() when trials train
        model.train()
        for _ in range(micro_steps):
            with SavedBytes(model) if on_host and not measured else nullcontext() as saved:
                forward_backward(micro, f"probe trial at micro-batch {size}")
            if saved is not None:
                measured.append(saved.total / size)
        fill_sharded_grads(model)
        optimizer.step()

    def first() -> int:
        if forward_only:  # nothing to measure: an evaluation forward keeps no activations
            return upper
        ceiling, why = host_ceiling(
            upper, saved_per_sample=max(measured), available=host_available(), margin=margin
        )
        host.append(why)
        return ceiling

    def cleanup() -> None:
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        drop_unsynced_grads(model)  # FSDP2 keeps no-sync gradients out of zero_grad's reach

    chosen: int | None = None
    reason = ""
    saved = snapshot(model, optimizer) if not forward_only else None
    try:
        with optimizer_hooks_off(optimizer) if optimizer is not None else nullcontext():
            found = search_max_batch(
                trial,
                upper,
                lower=lower,
                device=dev,
                agree=agree if ranks is not None else None,
                cleanup=cleanup,
                meter=meter,
                first=first if on_host or (forward_only and ranks is None) else None,
            )
        # measured while the trials' optimizer state still exists: what training will hold
        fixed = footprint(model, optimizer) if optimizer is not None else {}
        ceiling = apply_margin(
            found.largest_pass,
            margin=margin,
            hit_limit=found.hit_limit,
            lower=lower,
            top=TopReading.of(found.trials, found.largest_pass, found.limit_bytes),
        )
        measured_gpu = meter is not None and dev.type == "cuda"
        wanted = choose == "fastest" or (choose == "auto" and measured_gpu)
        if wanted and ranks is not None:  # ranks' ceilings differ until agreed: time alone
            host.append("choose='fastest' times one process; with several ranks the largest plan")
        elif wanted and optimizer is not None:

            def micro_step(size: int) -> None:
                micro = to_device(resize_batch(batch, size), dev)
                forward_backward(micro, f"timing micro-batch {size}")

            choice = time_and_choose(
                per_rank=upper,
                ceiling=ceiling,
                min_micro=lower,
                micro_step=micro_step,
                optimizer_step=optimizer.step,
                cleanup=cleanup,
                sync=lambda: torch.cuda.synchronize(dev) if dev.type == "cuda" else None,
                device=dev,
            )
            if choice is not None:
                chosen, reason = choice.plan.micro_batch, choice.reason
    finally:
        if saved is not None:
            restore(model, optimizer, saved)
        del saved
        free_memory(dev)
    return replace(
        found,
        max_micro=ceiling,
        margin=margin,
        fixed_bytes=fixed,
        notes=tuple(host),
        chosen=chosen,
        choice=reason,
    )
