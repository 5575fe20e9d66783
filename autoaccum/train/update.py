"""The optimizer update of one window: the deferred gradient reduction made ready, clipping,
the (possibly fp16-scaled) optimizer step, the scheduler step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from autoaccum import distributed as D
from autoaccum.step.oom import is_oom
from autoaccum.step.ranks import Ranks

__all__ = ["agreed_update", "apply_update", "note_failed_update", "ready_reduction"]


def ready_reduction(
    module: nn.Module, info: D.DistInfo, sync: str, where: str
) -> tuple[Callable[[], None], BaseException | None]:
    """The deferred sync's gradient reduction with its memory taken (a no-op for the other
    syncs and one rank), or why it could not be: for the window's loss exchange to tell every
    rank before any of them enters a collective."""
    if sync != "deferred":
        return lambda: None, None
    try:
        return D.prepare_reduction(module, info), None
    except Exception as exc:
        if is_oom(exc):
            exc.add_note(
                f"autoaccum: this happened making ready the gradient reduction of {where}, "
                "after every micro-batch of the window; nothing of it was applied (free memory "
                "held elsewhere, or use a smaller model or precision='bf16')"
            )
        return lambda: None, exc


def apply_update(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    scheduler: Any,
    max_grad_norm: float | None,
    window_loss: float,
) -> bool:
    """Clip the window's gradient, step the optimizer and then the scheduler; False when the
    fp16 GradScaler skipped the step (inf/NaN gradients), which does not step the scheduler.

    The GradScaler is unscaled once per window, before clipping; ``ReduceLROnPlateau`` steps
    on the window's loss.
    """
    if max_grad_norm is not None:
        scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    if scaler.is_enabled():
        scale_before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        stepped = scaler.get_scale() >= scale_before
    else:
        optimizer.step()
        stepped = True
    if stepped and scheduler is not None:
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(window_loss)  # it steps on a metric: the window loss
        else:
            scheduler.step()
    return stepped


def agreed_update(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    scheduler: Any,
    max_grad_norm: float | None,
    window_loss: float,
    *,
    ranks: Ranks,
    where: str,
) -> bool:
    """:func:`apply_update`, then (several ranks) the exchange that says whether every rank's
    update succeeded: a rank whose update failed stops them all."""
    failure: BaseException | None = None
    stepped = False
    try:
        stepped = apply_update(optimizer, scaler, scheduler, max_grad_norm, window_loss)
    except Exception as exc:
        failure = note_failed_update(exc, where)
    if ranks.multi:
        here = f"the optimizer update of {where}"
        ranks.agree("the optimizer update", failure=failure, where=here)
    if failure is not None:
        raise failure
    return stepped


def note_failed_update(exc: BaseException, where: str) -> BaseException:
    """``exc``, with a note saying what an out-of-memory error in the update means."""
    if is_oom(exc):
        exc.add_note(
            f"autoaccum: this happened in the optimizer update of {where}, after every "
            "micro-batch of the window; the weights may be partly updated, so the window is not "
            "run again (its gradients were cleared)"
        )
    return exc
