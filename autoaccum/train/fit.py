"""fit(): coordinates data → probe → plan → loop → result; the work is done elsewhere.

The process group and the device (:mod:`autoaccum.distributed`), the plan and the loop
(:class:`~autoaccum.train.accumulator.Accumulator`), the windows
(:mod:`autoaccum.train.data`), and the console output (:mod:`autoaccum.render`, imported
only when something is to be shown).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from autoaccum import distributed as D
from autoaccum.device import check_device
from autoaccum.errors import ConfigError, check_count, check_timeout
from autoaccum.memory.collect import memory_report
from autoaccum.memory.explain import explain
from autoaccum.memory.footprint import footprint
from autoaccum.memory.peaks import DEFAULT_MARGIN, check_margin
from autoaccum.results import FitResult
from autoaccum.schedule import Schedule, as_schedule
from autoaccum.step.losses import CountFn, LossFn
from autoaccum.step.model import check_model, has_batchnorm, train_mode
from autoaccum.train.accumulator import Accumulator
from autoaccum.train.checkpoint import resume_from
from autoaccum.train.data import WindowSource
from autoaccum.train.run import Run

__all__ = ["fit"]


def fit(
    model: nn.Module,
    loader: Iterable[Any],
    target_batch: int | Schedule | None = None,
    *,
    target_tokens: int | Schedule | None = None,
    loss_fn: LossFn | None = None,
    count_fn: CountFn | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    epochs: int = 1,
    max_steps: int | None = None,
    precision: str = "auto",
    max_grad_norm: float | None = None,
    max_micro: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    report: bool | Literal["full"] = True,
    margin: float = DEFAULT_MARGIN,
    sync: str = "auto",
    timeout: float = 600.0,
    callbacks: Sequence[Any] = (),
    resume: str | os.PathLike[str] | None = None,
    size_fn: Callable[[Any], int] | None = None,
    choose: str = "auto",
) -> FitResult:
    """Train ``model`` on ``loader`` with ``target_batch`` samples per optimizer step.

    The largest micro-batch that fits is probed with real samples: the heaviest of the
    dataset where it can be scanned (weighed by ``size_fn(sample)``, by default its tensors'
    elements), else the first window's (skipped when ``max_micro`` is given); the
    accumulation is planned so that micro-batches × ``accum_iter`` × ranks equal
    ``target_batch`` exactly (``choose="fastest"``: the plan with the most samples/s under
    that ceiling, timed; ``"largest"``; ``"auto"``: fastest on a GPU), and every optimizer
    step applies
    exactly the gradient of one big batch of the same samples — also for uneven micro
    sizes, token-level losses (``count_fn``) and the short last window of an epoch.
    ``target_batch`` defaults to 256; it may also be a schedule: a function of the optimizer
    steps done (``lambda step: …``) or :class:`~autoaccum.schedule.Ramp`, each step exact at
    its own size.

    ``target_tokens`` (instead of ``target_batch``; a number or a schedule): every optimizer
    step trains on exactly that many loss tokens over all ranks, the sample that crosses the
    budget split between two windows by masking its labels (where the count says where its
    labels are: the default count, :func:`~autoaccum.count_tokens`), micro-batches packed
    under a probed budget of padded tokens, longest first (see
    :mod:`autoaccum.train.data.tokens`). It needs a DataLoader over a map-style dataset.

    ``loss_fn(model, batch)`` returns the *mean* loss over the batch's items and
    ``count_fn(batch)`` how many items that is (default: samples; for the default loss on
    ``(inputs, integer targets)``, the targets that are not ``-100``). ``optimizer=None``
    means AdamW over the model's parameters; ``scheduler`` steps once per optimizer step.
    Under ``torchrun`` (or an initialised process group) ``target_batch`` is the global
    batch over all ranks and the model is wrapped in DistributedDataParallel. A process
    group ``fit`` creates from torchrun's variables is kept for the rest of the process and
    destroyed when it exits, so that calling ``fit`` again (pre-training then fine-tuning, a
    learning-rate sweep, train then evaluate) reuses it, as it would a group you initialised
    yourself; its collectives keep the first call's ``timeout``. The model trains in train
    mode and is handed back in the mode it came in.

    A run that still runs out of memory mid-training re-runs that window with a smaller
    micro-batch (nothing of it had reached the weights; in a multi-rank run every rank
    agrees first), keeps the smaller plan, and grows back after a run of clean windows.
    ``sync`` says how a multi-rank window reduces its gradients (see
    :class:`~autoaccum.train.accumulator.Accumulator`); ``timeout`` (seconds) bounds every
    collective of a process group ``fit`` creates, and of the ranks' exchange group.

    What it prints, on the first rank only: with ``report=True`` (the default) the plan in one
    line once it is made, and why (what fitted where); at the end a short summary (steps,
    samples, time, the loss first → last, and any out-of-memory recovery, micro-batch change
    or sample left out), with memory at the plan where memory was measured (a CUDA device, an
    emulated one). ``report="full"`` adds the probe's trials, a memory snapshot and the
    breakdown of memory with the reasons for the plan; ``report=False`` prints nothing.
    ``progress`` shows a progress bar on a terminal.

    ``callbacks`` act along the way (:mod:`autoaccum.train.callbacks`: evaluation, a JSON
    log, checkpoints, or your own; any can stop the run). ``resume`` (a checkpoint file, or
    a directory: its newest readable one) continues a run exactly where the checkpoint left
    it; ``resume="auto"`` continues from the newest checkpoint in the ``Checkpoint``
    callback's folder, or starts a new run when there is none, and warns which it did.
    ``epochs`` and ``max_steps`` count the whole run, the part before the checkpoint
    included. Checkpoints are loaded without running code, and everything in one is checked
    against the model, optimizer, scheduler and precision before any of it is loaded.
    """
    started = time.perf_counter()
    check_model(model)
    if target_batch is None and target_tokens is None:
        target_batch = 256
    if target_tokens is None:
        as_schedule(target_batch)  # a number, checked now; a schedule, at every step
    check_count("epochs", epochs)
    if max_steps is not None:
        check_count("max_steps", max_steps)
    if max_micro is not None:
        check_count("max_micro", max_micro)
    check_margin(margin)
    show = _check_report(report)
    limit = check_timeout(timeout)
    saved, said = resume_from(resume, callbacks) if resume is not None else (None, None)
    wanted = check_device(device) if device is not None else None  # before the model moves
    # kept for the process: a later fit reuses it (autoaccum.rendezvous)
    D.init_from_env(wanted.type if wanted is not None else None, timeout=limit)
    acc: Accumulator | None = None
    try:
        info = D.current()
        if said is not None and info.is_main:  # which way resume="auto" went, once
            warnings.warn(said, UserWarning, stacklevel=2)
        dev = D.select_device(wanted, info)
        model.to(dev)
        acc = Accumulator(
            model,
            optimizer,
            target_batch=target_batch,
            target_tokens=target_tokens,
            loss_fn=loss_fn,
            count_fn=count_fn,
            scheduler=scheduler,
            precision=precision,
            max_grad_norm=max_grad_norm,
            margin=margin,
            device=dev,
            prefetch=dev.type == "cuda" and bool(getattr(loader, "pin_memory", False)),
            sync=sync,
            timeout=limit,
            size_fn=size_fn,
            choose=choose,
        )
        source = acc.source(loader)  # built once: its epochs share workers and orders
        bar = _progress_bar(progress and info.is_main, source, acc, epochs, max_steps)
        run = Run(acc, source, epochs=epochs, max_steps=max_steps, callbacks=[*callbacks, bar])
        with train_mode(model), bar:
            planned = saved is not None and run.resume(saved)
            if planned:
                origin = "checkpoint"  # its plan, on the device it was probed on
            elif max_micro is not None:
                origin = "max_micro"
                acc.replan(max_micro)
            else:  # on the heaviest samples: no later micro-batch needs more memory
                origin = "probe"
                acc.probe_data(source)
            _warn_batchnorm(acc)
            if show is not None and info.is_main:
                _print_plan(acc, origin)
            run.train()
        assert acc.plan is not None  # planned above
        acc.plan = acc.planner.with_rank_sizes(
            acc.plan, acc.ranks
        )  # every rank's split, at the end
        memory, fixed = memory_report(dev), footprint(model, acc.optimizer)
        p = run.position
        result = FitResult(
            plan=acc.plan,
            probe=acc.probe_result,
            optimizer_steps=p.steps - p.skipped,
            samples_seen=p.samples,
            losses=p.losses,
            epochs=p.epochs_started,
            seconds=time.perf_counter() - started,
            precision=acc.precision,
            device=str(dev),
            skipped_steps=p.skipped,
            oom_retries=acc.resizer.oom_retries,
            resizes=tuple(acc.resizer.resizes),
            samples_dropped=acc.samples_dropped,
            items_seen=p.items,
            stopped_early=run.stopped is not None,
            evaluations=tuple(run.metrics),
            memory=memory,
            footprint=fixed,
            breakdown=explain(acc.probe_result, acc.plan, fixed, memory),
        )
        if show is not None and info.is_main:
            from autoaccum.render import print_fit_report

            print_fit_report(result, full=show == "full")
        return result
    finally:
        if acc is not None:
            acc.close()


def _check_report(report: object) -> str | None:
    """What ``report`` asks to be shown: None, "summary" or "full"; a ConfigError otherwise."""
    if isinstance(report, bool):
        return "summary" if report else None
    if isinstance(report, str) and report == "full":
        return "full"
    raise ConfigError(
        f"report must be True (the plan and a short summary), 'full' (every table too) or "
        f"False (nothing), got {report!r}"
    )


def _print_plan(acc: Accumulator, origin: str) -> None:
    """The plan in one line, and why, before the first step (the console, rank 0)."""
    from autoaccum.render import print_plan

    assert acc.plan is not None  # planned by the caller
    print_plan(acc.plan, acc.probe_result, origin)


def _warn_batchnorm(acc: Accumulator) -> None:
    plan = acc.plan
    if plan is not None and plan.accum_iter > 1 and has_batchnorm(acc.module):
        warnings.warn(
            f"the model has BatchNorm and accum_iter is {plan.accum_iter}: its batch "
            f"statistics see micro-batches of ~{plan.micro_batch} samples, not the window of "
            f"{plan.per_rank}, so training is not exactly full-batch for those layers. "
            "Consider GroupNorm/LayerNorm, or SyncBatchNorm across ranks",
            UserWarning,
            stacklevel=3,
        )


def _progress_bar(
    enabled: bool,
    source: WindowSource,
    acc: Accumulator,
    epochs: int,
    max_steps: int | None,
) -> Any:
    """The console progress bar (rich), a callback; a silent stand-in when not shown."""
    if not enabled:
        return _NoBar()
    from autoaccum.render import TrainProgress

    return TrainProgress(lambda: _total_steps(source, acc, epochs, max_steps))


def _total_steps(
    source: WindowSource, acc: Accumulator, epochs: int, max_steps: int | None
) -> int | None:
    """Optimizer steps the run will take, where knowable (for the bar's total)."""
    total: int | None = acc.steps
    for _ in range(epochs):
        windows = acc.epoch_windows(source, total) if total is not None else None
        total = total + windows if total is not None and windows is not None else None
        if total is None or (max_steps is not None and total >= max_steps):
            break
    if max_steps is not None:
        total = min(total, max_steps) if total is not None else max_steps
    return total


class _NoBar:
    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None
