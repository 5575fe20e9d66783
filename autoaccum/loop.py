"""One optimizer step over one window of micro-batches, exactly as one big batch would give.

The window's loss is the item-weighted mean over every item (sample or token) of the
window on every rank:  L = Σ_i mean_i · count_i / N,  N = Σ_i count_i over all ranks.
Counts are known before the first backward (the window is collated on the host and
``count_fn`` runs there; the total is all-reduced once), so micro-step i backpropagates
``mean_i · count_i · world / N``: DDP's gradient average over ``world`` ranks then
lands exactly on ∇L. Dividing by ``accum_iter`` instead is only right when every
micro-batch carries the same number of items, which uneven splits (86, 85, 85),
token-level losses and the short last window of an epoch all break.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from autoaccum.distributed import DistInfo, all_reduce_sum, gradient_sync
from autoaccum.errors import ConfigError, NonFiniteLossError
from autoaccum.losses import CountFn, LossFn
from autoaccum.precision import autocast
from autoaccum.probe import check_loss
from autoaccum.tree import batch_size, to_device

__all__ = ["Stepper", "WindowOutcome"]


@dataclass(frozen=True)
class WindowOutcome:
    loss: float  #: the true window loss (item-weighted, all ranks)
    items: float  #: items behind it (all ranks)
    samples: int  #: samples in the window (all ranks)
    stepped: bool  #: False when the fp16 GradScaler skipped the step (inf/NaN gradients)


def _count(count_fn: CountFn, batch: Any) -> float:
    value: object = count_fn(batch)
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ConfigError(
                f"count_fn must return one number (items in the micro-batch), got a tensor of "
                f"shape {tuple(value.shape)}"
            )
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigError(f"count_fn must return a number ≥ 0 of items, got {value!r}")
    return float(value)


@dataclass
class Stepper:
    """Everything one window needs; :meth:`step` runs one window and one optimizer step."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: LossFn
    count_fn: CountFn
    device: torch.device
    precision: str
    scaler: torch.amp.GradScaler
    dist: DistInfo
    scheduler: Any = None
    max_grad_norm: float | None = None
    prefetch: bool = False  #: copy micro-batch i+1 while i computes (pinned host memory)
    applying: bool = False  #: True while the optimizer step runs (the weights are changing)

    def step(self, micro_batches: Sequence[Any], where: str) -> WindowOutcome:
        """Train on one window; nothing of it reaches the weights unless all of it succeeded."""
        try:
            return self._step(micro_batches, where)
        except BaseException:
            self.optimizer.zero_grad(set_to_none=True)
            raise

    def _step(self, micro_batches: Sequence[Any], where: str) -> WindowOutcome:
        self.applying = False
        counts = [_count(self.count_fn, mb) for mb in micro_batches]
        totals = torch.tensor(
            [sum(counts), float(sum(batch_size(mb) for mb in micro_batches))], dtype=torch.float64
        )
        all_reduce_sum(totals, self.dist)
        items, samples = float(totals[0]), int(totals[1])
        if items <= 0:
            raise ConfigError(
                f"count_fn counted 0 items in the whole window ({where}); every window needs at "
                "least one item (e.g. a target token that is not ignored) to define a mean loss"
            )
        world = self.dist.world_size if self.dist.active else 1
        last = len(micro_batches) - 1
        # float64 accumulation of the reported loss; MPS has no float64
        acc_dtype = torch.float32 if self.device.type == "mps" else torch.float64
        loss_sum = torch.zeros((), dtype=acc_dtype, device=self.device)
        micro_losses: list[torch.Tensor] = []
        upcoming = to_device(micro_batches[0], self.device, non_blocking=self.prefetch)
        for i, count in enumerate(counts):
            batch, upcoming = upcoming, None
            if self.prefetch and i < last:
                upcoming = to_device(micro_batches[i + 1], self.device, non_blocking=True)
            with gradient_sync(self.model, enabled=i == last):
                with autocast(self.precision, self.device):
                    loss = check_loss(self.loss_fn(self.model, batch), where)
                if loss.dtype in (torch.float16, torch.bfloat16):
                    loss = loss.float()  # weight in fp32: bf16 has 8 bits of mantissa
                weighted = loss * (count * world / items)
                self.scaler.scale(weighted).backward()  # type: ignore[no-untyped-call]
            detached = loss.detach().to(acc_dtype)
            micro_losses.append(detached)
            loss_sum += detached * count
            del loss, weighted, batch
            if upcoming is None and i < last:
                upcoming = to_device(micro_batches[i + 1], self.device)
        all_reduce_sum(loss_sum, self.dist)
        window_loss = float(loss_sum) / items
        if not math.isfinite(window_loss):
            raise NonFiniteLossError(self._non_finite_message(micro_losses, window_loss, where))
        self.applying = True
        stepped = self._optimizer_step()
        self.applying = False
        if stepped and self.scheduler is not None:
            if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.scheduler.step(window_loss)  # it steps on a metric: the window loss
            else:
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return WindowOutcome(window_loss, items, samples, stepped)

    def _optimizer_step(self) -> bool:
        if self.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        if not self.scaler.is_enabled():
            self.optimizer.step()
            return True
        scale_before = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= scale_before

    def _non_finite_message(
        self, micro_losses: list[torch.Tensor], window_loss: float, where: str
    ) -> str:
        bad = [i for i, value in enumerate(micro_losses) if not torch.isfinite(value)]
        detail = (
            f"micro-batch {bad[0] + 1} of {len(micro_losses)} on rank {self.dist.rank} gave "
            f"{float(micro_losses[bad[0]])}"
            if bad
            else "another rank's micro-batch was non-finite"
        )
        return (
            f"the loss was {window_loss} at {where}: {detail}. Nothing of this window was applied "
            "to the weights. Check the data of that window for NaN/inf, lower the learning rate, "
            "set max_grad_norm, or use precision='bf16' instead of 'fp16'"
        )
