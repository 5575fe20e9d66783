"""fit(): data → probe → plan → loop, with progress and a memory report."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from autoaccum import distributed as D
from autoaccum.data import WindowStream
from autoaccum.errors import BatchError, ConfigError
from autoaccum.loop import Stepper
from autoaccum.losses import CountFn, LossFn, default_count, default_loss
from autoaccum.plan import Plan, check_count, make_plan
from autoaccum.precision import make_scaler, resolve_precision
from autoaccum.probe import DEFAULT_MARGIN, check_model_optimizer, has_batchnorm, probe
from autoaccum.progress import TrainProgress
from autoaccum.recover import step_with_recovery
from autoaccum.result import FitResult
from autoaccum.search import ProbeResult
from autoaccum.state import preserved_rng
from autoaccum.tree import batch_size

__all__ = ["fit"]


def _check_args(
    model: object,
    target_batch: object,
    epochs: object,
    max_steps: object,
    max_micro: object,
    max_grad_norm: object,
    loss_fn: object,
    count_fn: object,
) -> None:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_count("target_batch", target_batch)
    check_count("epochs", epochs)
    if max_steps is not None:
        check_count("max_steps", max_steps)
    if max_micro is not None:
        check_count("max_micro", max_micro)
    if max_grad_norm is not None and (
        isinstance(max_grad_norm, bool)
        or not isinstance(max_grad_norm, (int, float))
        or not math.isfinite(max_grad_norm)
        or max_grad_norm <= 0
    ):
        raise ConfigError(f"max_grad_norm must be a positive number or None, got {max_grad_norm!r}")
    for name, fn in (("loss_fn", loss_fn), ("count_fn", count_fn)):
        if fn is not None and not callable(fn):
            raise ConfigError(f"{name} must be callable or None, got {type(fn).__name__}")


def _plan(
    wrapped: nn.Module,
    stream: WindowStream,
    *,
    target_batch: int,
    max_micro: int | None,
    info: D.DistInfo,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    precision: str,
    margin: float,
    device: torch.device,
) -> tuple[Plan, ProbeResult | None]:
    world = info.world_size
    per_rank = target_batch // world  # fit() has checked that it divides
    if max_micro is not None:
        return make_plan(target_batch, min(max_micro, per_rank), world), None

    def agree(failed: bool) -> bool:
        return D.all_reduce_max(float(failed), info) > 0

    # Sampling the probe batch and the probe itself must not shift the data order or
    # the model's randomness: training then starts exactly as it would without a probe.
    with preserved_rng():
        sample = stream.sample_batch(per_rank)
        found = probe(
            wrapped,
            sample,
            loss_fn=loss_fn,
            optimizer=optimizer,
            upper=per_rank,
            precision=precision,
            margin=margin,
            device=device,
            agree=agree if info.active and world > 1 else None,
        )
        del sample
    micro = int(D.all_reduce_min(float(found.micro_batch), info))
    return make_plan(target_batch, micro, world), found


def fit(
    model: nn.Module,
    loader: Iterable[Any],
    target_batch: int = 256,
    *,
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
    report: bool = True,
    margin: float = DEFAULT_MARGIN,
) -> FitResult:
    """Train ``model`` on ``loader`` with ``target_batch`` samples per optimizer step.

    The largest micro-batch that fits is probed with real samples of the first window
    (skipped when ``max_micro`` is given), the accumulation is planned so that micro-batches
    × ``accum_iter`` × ranks equal ``target_batch`` exactly, and every optimizer step applies
    exactly the gradient of one big batch of the same samples — also for uneven micro
    sizes, token-level losses (``count_fn``) and the short last window of an epoch.

    ``loss_fn(model, batch)`` returns the *mean* loss over the batch's items and
    ``count_fn(batch)`` how many items that is (default: samples; for the default loss on
    ``(inputs, integer targets)``, the targets that are not ``-100``). ``optimizer=None``
    means AdamW over the model's parameters; ``scheduler`` steps once per optimizer step.
    Under ``torchrun`` (or an initialised process group) ``target_batch`` is the global
    batch over all ranks and the model is wrapped in DistributedDataParallel.

    A single-process run that still runs out of memory mid-training re-runs that window
    with a 10% smaller micro-batch (nothing of it had reached the weights) and keeps the
    smaller plan; see :mod:`autoaccum.recover`.
    """
    _check_args(model, target_batch, epochs, max_steps, max_micro, max_grad_norm, loss_fn, count_fn)
    started = time.perf_counter()
    guess = torch.device(device).type if device is not None else None
    created_group = D.init_from_env(guess)
    try:
        info = D.current()
        dev = D.select_device(device, info)
        prec = resolve_precision(precision, dev)
        model.to(dev)
        if optimizer is None:
            optimizer = torch.optim.AdamW(model.parameters())
        check_model_optimizer(model, optimizer)
        make_plan(target_batch, 1, info.world_size)  # a PlanError before any data is read
        wrapped = D.wrap_model(model, info, dev)
        stream = WindowStream(loader, rank=info.rank, world_size=info.world_size)
        loss_fn = loss_fn if loss_fn is not None else default_loss
        if count_fn is None:
            count_fn = default_count if loss_fn is default_loss else batch_size
        plan, found = _plan(
            wrapped,
            stream,
            target_batch=target_batch,
            max_micro=max_micro,
            info=info,
            loss_fn=loss_fn,
            optimizer=optimizer,
            precision=prec,
            margin=margin,
            device=dev,
        )
        if plan.accum_iter > 1 and has_batchnorm(model):
            warnings.warn(
                f"the model has BatchNorm and accum_iter is {plan.accum_iter}: its batch "
                f"statistics see micro-batches of ~{plan.micro_batch} samples, not the window of "
                f"{plan.per_rank}, so training is not exactly full-batch for those layers. "
                "Consider GroupNorm/LayerNorm, or SyncBatchNorm across ranks",
                UserWarning,
                stacklevel=2,
            )
        stepper = Stepper(
            model=wrapped,
            optimizer=optimizer,
            loss_fn=loss_fn,
            count_fn=count_fn,
            device=dev,
            precision=prec,
            scaler=make_scaler(prec, dev),
            dist=info,
            scheduler=scheduler,
            max_grad_norm=float(max_grad_norm) if max_grad_norm is not None else None,
            prefetch=dev.type == "cuda" and bool(getattr(loader, "pin_memory", False)),
        )
        result = _train(stepper, stream, plan, found, epochs, max_steps, progress, info)
        result = _finish(result, model, optimizer, dev, started)
        if report and info.is_main:
            from autoaccum.report import print_fit_report

            print_fit_report(result)
        return result
    finally:
        if created_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(
    stepper: Stepper,
    stream: WindowStream,
    plan: Plan,
    found: ProbeResult | None,
    epochs: int,
    max_steps: int | None,
    progress: bool,
    info: D.DistInfo,
) -> FitResult:
    per_epoch = stream.num_windows(plan)
    total = per_epoch * epochs if per_epoch is not None else None
    if max_steps is not None:
        total = min(total, max_steps) if total is not None else max_steps
    losses: list[float] = []
    samples_seen = skipped = epochs_started = oom_retries = 0
    agree_windows = info.active and info.world_size > 1 and not stream.is_loader
    with TrainProgress(
        enabled=progress and info.is_main, total=total, plan_text=plan.describe()
    ) as bar:
        for epoch in range(epochs):
            if max_steps is not None and len(losses) >= max_steps:
                break
            epochs_started += 1
            windows = 0
            for window in stream.windows(plan, epoch):  # a plan shrunk by an OOM applies next epoch
                steps = len(window.micro_batches)
                if agree_windows and not D.agree_window(steps, stepper.model, info):
                    break
                where = f"optimizer step {len(losses) + 1} (epoch {epoch}, window {window.index})"
                outcome, plan, retries = step_with_recovery(
                    stepper, window.micro_batches, plan, where
                )
                oom_retries += retries
                windows += 1
                losses.append(outcome.loss)
                samples_seen += outcome.samples
                skipped += not outcome.stepped
                bar.update(samples=outcome.samples, loss=outcome.loss)
                if max_steps is not None and len(losses) >= max_steps:
                    break
            else:
                if agree_windows:
                    D.agree_window(0, stepper.model, info)  # tell ranks holding data to stop
            if windows == 0:
                if epoch == 0:
                    raise BatchError("the loader yielded no samples; give it a non-empty dataset")
                raise ConfigError(
                    f"epoch {epoch} yielded no data: the loader is a one-shot iterator that was "
                    "used up by the previous epoch. Pass a re-iterable (a DataLoader or a list "
                    "of batches) to train for several epochs"
                )
    return FitResult(
        plan=plan,
        probe=found,
        optimizer_steps=len(losses) - skipped,
        samples_seen=samples_seen,
        losses=tuple(losses),
        epochs=epochs_started,
        seconds=0.0,
        precision=stepper.precision,
        device=str(stepper.device),
        skipped_steps=skipped,
        oom_retries=oom_retries,
    )


def _finish(
    result: FitResult,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    started: float,
) -> FitResult:
    from dataclasses import replace

    from autoaccum.footprint import footprint
    from autoaccum.memory import memory_report

    return replace(
        result,
        seconds=time.perf_counter() - started,
        memory=memory_report(device),
        footprint=footprint(model, optimizer),
    )
