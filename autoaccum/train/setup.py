"""An accumulator's arguments, checked before any work: each a clear error of the
:class:`~autoaccum.errors.AutoAccumError` family, nothing changed on a failure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autoaccum.errors import ConfigError, check_callable, check_positive
from autoaccum.memory.peaks import check_margin
from autoaccum.plan import check_target
from autoaccum.probing.fastest import check_choose
from autoaccum.schedule import Schedule, as_schedule, constant, fingerprint
from autoaccum.step.batches import batch_size
from autoaccum.step.counting import resolve_loss
from autoaccum.step.losses import CountFn, LossFn
from autoaccum.step.model import (
    check_model,
    check_model_optimizer,
    default_optimizer,
    min_micro,
    model_device,
)
from autoaccum.step.precision import resolve_precision

__all__ = ["Checked", "check_arguments"]


@dataclass(frozen=True)
class Checked:
    """What the arguments became."""

    module: nn.Module
    schedule: Schedule  #: samples per step, or loss tokens with ``tokens``
    tokens: bool  #: the target counts loss tokens (``target_tokens``), not samples
    max_grad_norm: float | None
    margin: float
    device: torch.device
    precision: str
    optimizer: torch.optim.Optimizer
    loss_fn: LossFn
    count_fn: CountFn
    choose: str
    size_fn: Any

    def settings(self, sync: str) -> dict[str, object]:
        """What every rank must share: the target (a schedule's first values), the rest."""
        first = constant(self.schedule) or fingerprint(self.schedule)
        return {
            "target_tokens" if self.tokens else "target_batch": first,
            "precision": self.precision,
            "sync": sync,
            "choose": self.choose,
            "margin": self.margin,
            "max_grad_norm": self.max_grad_norm,
        }


def check_arguments(
    model: object,
    optimizer: object,
    *,
    target_batch: object,
    target_tokens: object,
    world_size: int,
    loss_fn: Any,
    count_fn: Any,
    max_grad_norm: object,
    margin: object,
    device: torch.device | None,
    precision: str,
    choose: str,
    size_fn: Any,
) -> Checked:
    """The arguments, checked (see the module's doc)."""
    module = check_model(model)
    if (target_batch is None) == (target_tokens is None):
        raise ConfigError(
            "give one target: target_batch (samples per optimizer step) or target_tokens "
            f"(loss tokens per step); got target_batch={target_batch!r}, "
            f"target_tokens={target_tokens!r}"
        )
    tokens = target_tokens is not None
    schedule = as_schedule(
        target_tokens if tokens else target_batch, "target_tokens" if tokens else "target_batch"
    )
    check_target(schedule(0), world_size, min_micro=1 if tokens else min_micro(module))
    dev = device if device is not None else model_device(module)
    prec = resolve_precision(precision, dev)
    loss, count = resolve_loss(loss_fn, count_fn)
    if tokens and count is batch_size:
        raise ConfigError(
            "target_tokens counts loss tokens, but loss_fn was given without count_fn, so every "
            "sample would count as one item: pass count_fn=autoaccum.count_tokens() (the "
            "labels that are not -100, less each row's first as causal LMs shift them; "
            "count_tokens(shift=False) where the loss does not shift) or a count of your own"
        )
    return Checked(
        module=module,
        schedule=schedule,
        tokens=tokens,
        max_grad_norm=(
            check_positive("max_grad_norm", max_grad_norm) if max_grad_norm is not None else None
        ),
        margin=check_margin(margin),
        device=dev,
        precision=prec,
        optimizer=check_model_optimizer(module, optimizer or default_optimizer(module)),
        loss_fn=loss,
        count_fn=count,
        choose=check_choose(choose),
        size_fn=check_callable("size_fn", size_fn, "size_fn(sample) -> int") if size_fn else None,
    )
