"""A window's weights: its micro-batches with their share of the window's loss, and its
running state.

The window's loss is the item-weighted mean over every item (sample or token) of the
window on every rank:  L = Σ_i mean_i · count_i / N,  N = Σ_i count_i over all ranks.
Counts are known before the first backward (the window is collated on the host and
``count_fn`` runs there; the total is all-reduced once, :func:`open_window`), so micro-step
i backpropagates ``mean_i · count_i · world / N``: DDP's gradient average over ``world``
ranks then lands exactly on ∇L. Dividing by ``accum_iter`` instead is only right when
every micro-batch carries the same number of items, which uneven splits (86, 85, 85),
token-level losses and the short last window of an epoch all break.

The open window's running state (:class:`OpenWindow`) keeps what went through backward
and the float64 loss sum; :class:`BufferBackup` the buffers to put back if the window is
dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from autoaccum import distributed as D
from autoaccum.errors import ConfigError, check_item_count
from autoaccum.step.batches import batch_size, to_device
from autoaccum.step.losses import CountFn

__all__ = [
    "BufferBackup",
    "Micro",
    "OpenWindow",
    "StepOutcome",
    "applied_twice",
    "check_items",
    "count_window",
    "open_window",
    "reopened",
    "stand_in",
    "window_samples",
]


@dataclass(frozen=True)
class Micro:
    """One micro-batch of a window, with the weight its mean loss gets in the window's loss."""

    batch: Any  #: the host batch
    index: int  #: 0-based position in its window
    count: float  #: items its mean loss is over (``count_fn``)
    weight: float  #: ``count · world_size / N``: its share of the window's loss, times ranks
    last: bool  #: the micro-step that reduces the window's gradients across ranks
    window: Any = field(repr=False, compare=False)  #: the TrainWindow it belongs to


@dataclass(frozen=True)
class StepOutcome:
    """What one window's optimizer step did."""

    loss: float  #: the true window loss (item-weighted, all ranks)
    samples: int  #: samples in the window (all ranks)
    items: float  #: items behind the loss (all ranks)
    stepped: bool  #: False when the fp16 GradScaler skipped the step (inf/NaN gradients)


def count_window(micro_batches: Sequence[Any], count_fn: CountFn, where: str) -> list[float]:
    """Items per micro-batch of this rank's part of a window, checked."""
    return [
        check_item_count(count_fn(mb), f"{where}, micro-batch {i + 1}")
        for i, mb in enumerate(micro_batches)
    ]


def window_samples(micro_batches: Sequence[Any]) -> int:
    return sum(batch_size(mb) for mb in micro_batches)


def check_items(items: float, where: str) -> None:
    """Every window needs an item somewhere (on some rank) to define its mean loss."""
    if items <= 0:
        raise ConfigError(
            f"count_fn counted 0 items in the whole window ({where}); every window needs at "
            "least one item (e.g. a target token that is not ignored) to define a mean loss"
        )


def applied_twice(index: int, epoch: int) -> str:
    return (
        f"window {index} of epoch {epoch} was already applied by step(); each window trains "
        "once: take the next one from acc.windows(...)"
    )


def reopened(current: Any, state: OpenWindow, window: Any) -> str | None:
    """What is wrong with opening ``window`` while ``current`` is open (None: nothing, it is
    the same window, iterated again before any backward)."""
    if current is not window:
        return (
            f"a new window was started while window {current.index} still waited for step(): "
            "call acc.step() after the micro-steps of each window (that window was dropped)"
        )
    if state.done:
        return (
            f"window {window.index} was iterated again after {state.done} of its micro-batches "
            "went through backward(): each micro-batch goes through backward() once per window, "
            "then step() (the window was dropped, nothing of it applied)"
        )
    return None


def stand_in(micros: Sequence[Micro], where: str) -> Micro:
    """A micro-batch of the window with items, run with weight 0 in place of one without (or
    of a micro-step this rank has no micro-batch for), where the reduction's collectives must
    run on every rank (``sync="overlap"``): its gradient adds exactly nothing."""
    for other in micros:
        if other.count > 0:
            return other
    raise ConfigError(
        f"this rank has no item (no target token that is not ignored, or no sample: a short "
        f"last window with fewer samples than ranks) in any micro-batch of {where}, and with "
        "sync='overlap' (FSDP2) every rank must run every micro-step; give every rank data "
        "with targets (drop_last=True drops a short last window), or use DDP with "
        "sync='deferred'"
    )


class Gradients:
    """Clears a module's gradients (set to None) from a list of its parameters read once:
    ``nn.Module.zero_grad`` walks the module tree at every call, twice a window here."""

    def __init__(self) -> None:
        self._params: list[torch.nn.Parameter] | None = None

    def clear(self, module: torch.nn.Module) -> None:
        if self._params is None:
            self._params = list(module.parameters())
        for param in self._params:
            param.grad = None


class BufferBackup:
    """The model's buffers (BatchNorm statistics, counters) as they were when a window began,
    so that a window that is dropped (an error, an out-of-memory retry) leaves no trace in
    them. The copies are allocated once and refilled in place."""

    def __init__(self) -> None:
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    @torch.no_grad()
    def save(self, model: nn.Module) -> None:
        buffers = [D.local_tensor(b) for b in model.buffers()]
        same = len(buffers) == len(self._pairs) and all(
            b is kept and b.shape == copy.shape and b.dtype == copy.dtype
            for b, (kept, copy) in zip(buffers, self._pairs, strict=True)
        )
        if not same:
            self._pairs = [(b, b.detach().clone()) for b in buffers]
            return
        for buffer, copy in self._pairs:
            copy.copy_(buffer)

    @torch.no_grad()
    def restore(self) -> None:
        for buffer, copy in self._pairs:
            buffer.copy_(copy)


class OpenWindow:
    """The running state of the window being trained: micro-steps done, the loss so far."""

    def __init__(self, micros: int, items: float, samples: int, device: torch.device) -> None:
        self.micros = micros
        self.items = items
        self.samples = samples
        self.done = 0
        # float64 accumulation of the reported loss; MPS has no float64
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self.loss_sum = torch.zeros((), dtype=dtype, device=device)
        self.micro_losses: list[torch.Tensor] = []
        self.upcoming: Any = None  #: the next micro-batch, already on its way to the device
        self.most_steps = micros  #: the most micro-steps any rank has in this window

    def prefetch(self, micros: Sequence[Micro], index: int, device: torch.device) -> Any:
        """Micro-batch ``index``'s copy on the device, if one was started (else None), and the
        next one's copy started, so that it moves while this one computes."""
        ready, self.upcoming = self.upcoming, None
        if index + 1 < len(micros):
            self.upcoming = to_device(micros[index + 1].batch, device, non_blocking=True)
        return ready

    def expect(self, index: int) -> None:
        """Check that micro-batch ``index`` is the next one to go through backward."""
        if index != self.done:
            raise ConfigError(
                f"backward() got micro-batch {index + 1} of {self.micros} but expected "
                f"{self.done + 1}: each micro-batch once, in order"
            )

    def add(self, loss: torch.Tensor, count: float) -> None:
        """Record micro-step ``self.done``'s mean loss over ``count`` items."""
        value = loss.to(self.loss_sum.dtype)
        self.micro_losses.append(value)
        if count:  # a micro-batch without items adds nothing (its mean may be NaN: 0/0)
            self.loss_sum += value * count
        self.done += 1

    def skip(self) -> None:
        """Record micro-step ``self.done`` as one without items, trained without compute."""
        self.micro_losses.append(torch.zeros((), dtype=self.loss_sum.dtype))
        self.done += 1

    def non_finite_message(self, window_loss: float, where: str, rank: int, world: int) -> str:
        bad = [i for i, value in enumerate(self.micro_losses) if not torch.isfinite(value)]
        detail = (
            f"micro-batch {bad[0] + 1} of {len(self.micro_losses)} on rank {rank} gave "
            f"{float(self.micro_losses[bad[0]])}"
            if bad
            else f"a micro-batch on another of the {world} ranks was non-finite"
        )
        return (
            f"the loss was {window_loss} at {where}: {detail}. Nothing of this window was applied "
            "to the weights. Check the data of that window for NaN/inf, lower the learning rate, "
            "set max_grad_norm, or use precision='bf16' instead of 'fp16'"
        )


def open_window(
    window: Any,
    counts: list[float],
    items: float,
    samples: int,
    world: int,
    device: torch.device,
    steps: int | None = None,
) -> tuple[list[Micro], OpenWindow]:
    """The window's micro-batches with their weights (``items`` and ``samples`` over all
    ``world`` ranks), and its fresh running state. ``steps``: run that many micro-steps, the
    ones beyond this rank's micro-batches adding nothing (where every rank must run every
    micro-step: FSDP2, overlapped sync)."""
    batches = list(window.data.micro_batches)
    steps = max(steps or 0, len(batches))
    counts = counts + [0.0] * (steps - len(batches))
    batches += [None] * (steps - len(batches))  # stand-ins: run with weight 0 (stand_in)
    micros = [
        Micro(batch, i, count, count * world / items, i == steps - 1, window)
        for i, (batch, count) in enumerate(zip(batches, counts, strict=True))
    ]
    return micros, OpenWindow(len(micros), items, samples, device)
