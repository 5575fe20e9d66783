"""The optimizer update of one window: clipping, the (possibly fp16-scaled) optimizer step,
the scheduler step."""

from __future__ import annotations

from typing import Any

import torch

from autoaccum.step.oom import is_oom

__all__ = ["apply_update", "note_failed_update"]


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


def note_failed_update(exc: BaseException, where: str) -> BaseException:
    """``exc``, with a note saying what an out-of-memory error in the update means."""
    if is_oom(exc):
        exc.add_note(
            f"autoaccum: this happened in the optimizer update of {where}, after every "
            "micro-batch of the window; the weights may be partly updated, so the window is not "
            "run again (its gradients were cleared)"
        )
    return exc
