"""The mechanics of one window: weighing its micro-batches, each micro-step's forward and
backward, and the optimizer step that applies the window (or the abort that drops it).

:class:`Stepping` is the part of :class:`~autoaccum.train.accumulator.Accumulator` that runs
a window; the accumulator adds planning, data and the robust path around it.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from autoaccum import distributed as D
from autoaccum.errors import ConfigError, NonFiniteLossError
from autoaccum.train.agree import Agreement
from autoaccum.train.batches import to_device
from autoaccum.train.data import Window
from autoaccum.train.guard import Guard
from autoaccum.train.losses import CountFn, LossFn, check_loss
from autoaccum.train.precision import autocast
from autoaccum.train.update import apply_update
from autoaccum.train.window import (
    BufferBackup,
    Micro,
    OpenWindow,
    StepOutcome,
    TrainWindow,
    check_items,
    count_window,
    open_window,
    window_samples,
)

__all__ = ["SYNC_MODES", "Stepping", "check_sync", "resolve_sync"]

#: How a multi-rank window reduces its gradients (see the accumulator).
SYNC_MODES = ("auto", "deferred", "overlap")


class Stepping:
    """Runs windows: ``begin`` (by iterating a window), ``backward`` per micro-batch, ``step``."""

    module: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    loss_fn: LossFn
    count_fn: CountFn
    device: torch.device
    precision: str
    max_grad_norm: float | None
    prefetch: bool
    sync: str
    dist: D.DistInfo
    agreement: Agreement
    guard: Guard
    steps: int
    _open: tuple[TrainWindow, list[Micro], OpenWindow] | None
    _buffers: BufferBackup
    _prepared: bool  #: the count function's ``prepare`` has run

    def begin(self, window: TrainWindow) -> list[Micro]:
        """Count the window's items (all ranks) and weigh its micro-batches; called by iterating
        a :class:`TrainWindow`. Starting a new window while one is open is an error."""
        if window.applied:
            raise ConfigError(
                f"window {window.index} of epoch {window.epoch} was already applied by step(); "
                "each window trains once: take the next one from acc.windows(...)"
            )
        if self._open is not None:
            current, _, open_state = self._open
            if current is not window:
                self.abort()
                raise ConfigError(
                    f"a new window was started while window {current.index} still waited "
                    "for step(): call acc.step() after the micro-steps of each window (that "
                    "window was dropped)"
                )
            if open_state.done:
                done = open_state.done
                self.abort()
                raise ConfigError(
                    f"window {window.index} was iterated again after {done} of its micro-batches "
                    "went through backward(): each micro-batch goes through backward() once per "
                    "window, then step() (the window was dropped, nothing of it applied)"
                )
        # every window starts from zero gradients on every trainable parameter of the model:
        # none left by the user's own backward before, or by parameters the optimizer lacks
        self.module.zero_grad(set_to_none=True)
        where = self.where(window.data)
        batches = window.data.micro_batches

        def count() -> list[float]:
            prepare = getattr(self.count_fn, "prepare", None)
            if callable(prepare) and not self._prepared:  # e.g. whether the model shifts labels
                prepare(self.forward_model, to_device(batches[0], self.device))
                self._prepared = True
            return count_window(batches, self.count_fn, where)

        counts = self.guard.run(count)
        agreed = self.guard.agree(
            "counting a window's items",
            items=sum(counts),
            samples=window_samples(batches),
            each=len(batches),
        )
        check_items(agreed.items, where)
        micros, state = open_window(
            window, counts, agreed.items, agreed.samples, self.agreement.ranks, self.device
        )
        state.most_steps = max(agreed.each)
        self._buffers.save(self.module)
        if self.prefetch:
            state.upcoming = to_device(micros[0].batch, self.device, non_blocking=True)
        self._open = (window, micros, state)
        return micros

    def where(self, window: Window) -> str:
        return f"optimizer step {self.steps + 1} (epoch {window.epoch}, window {window.index})"

    def backward(self, micro: Micro) -> torch.Tensor:
        """Forward and backward of one micro-batch, weighted by its share of the window's
        items. Returns the micro-batch's mean loss, detached. A micro-batch without items
        (every target ignored) adds nothing and is skipped where no collective needs it."""
        if self._open is None or micro.window is not self._open[0]:
            raise ConfigError(
                "backward() got a micro-batch that is not of the open window; iterate "
                "`for micro in window` over a window from acc.windows(...)"
            )
        _, micros, state = self._open
        try:
            state.expect(micro.index)
        except ConfigError:
            self.abort()
            raise
        run, weight = micro, micro.weight
        if micro.count == 0 and self.sync == "overlap":  # the collectives must still run
            run, weight = self._stand_in(micro, micros), 0.0
        prefetched, state.upcoming = state.upcoming, None
        if self.prefetch and not micro.last:  # the next one copies while this one computes
            following = micros[micro.index + 1].batch
            state.upcoming = to_device(following, self.device, non_blocking=True)
        if micro.count == 0 and run is micro:  # nothing to add, and nothing needs it to run
            state.skip()
            return torch.zeros(())
        batch = prefetched if prefetched is not None and run is micro else None
        if batch is None:
            batch = to_device(run.batch, self.device)
        where = f"{self.where(micro.window.data)}, micro-batch {micro.index + 1}"
        try:
            with self._sync(micro.last):
                with autocast(self.precision, self.device):
                    loss = check_loss(self.loss_fn(self.forward_model, batch), where)
                if loss.dtype in (torch.float16, torch.bfloat16):
                    loss = loss.float()  # weight in fp32: bf16 has 8 bits of mantissa
                self.scaler.scale(loss * weight).backward()  # type: ignore[no-untyped-call]
        except BaseException:
            self.abort()
            raise
        detached = loss.detach()
        del loss, batch
        state.add(detached, micro.count)
        return detached

    @property
    def forward_model(self) -> nn.Module:
        """The module a micro-step calls: DDP's inner module when the window's gradients are
        reduced by :meth:`step` (no DDP forward, hence no collective inside a micro-step)."""
        if self.sync == "deferred" and isinstance(self.model, nn.parallel.DistributedDataParallel):
            inner: nn.Module = self.model.module
            return inner
        return self.model

    def _sync(self, last: bool) -> AbstractContextManager[None]:
        if self.sync == "overlap":
            return D.gradient_sync(self.model, enabled=last)
        return nullcontext()

    def _stand_in(self, micro: Micro, micros: list[Micro]) -> Micro:
        """A micro-batch of the window with items, run with weight 0 in place of one without,
        where the reduction's collectives must run on every rank (``sync="overlap"``)."""
        for other in micros:
            if other.count > 0:
                return other
        raise ConfigError(
            f"this rank has no item (no target token that is not ignored) in any micro-batch of "
            f"{self.where(micro.window.data)}, and with sync='overlap' (FSDP2) every rank must "
            "run every micro-step; give every rank data with targets, or use DDP with "
            "sync='deferred'"
        )

    def step(self) -> StepOutcome:
        """Apply the window: reduce the gradients across ranks (deferred sync), clip, step the
        optimizer and the scheduler, zero the gradients.

        Raises when not every micro-batch of the window went through :meth:`backward` (the
        gradient would be mis-weighted) and, with nothing applied, when the window's loss is
        not finite. Once the optimizer has stepped, nothing of the window is ever re-run.
        """
        if self._open is None:
            raise ConfigError("step() without a window: iterate a window from acc.windows(...)")
        window, _, state = self._open
        if state.done != state.micros:
            self.abort()
            raise ConfigError(
                f"step() after {state.done} of {state.micros} micro-batches of the window: a "
                "partial window would be mis-weighted; call backward() on every micro-batch "
                "(the window was dropped, nothing of it applied)"
            )
        where = self.where(window.data)
        agreed = self.guard.agree("the window's loss", loss=float(state.loss_sum))
        window_loss = agreed.loss / state.items
        if not math.isfinite(window_loss):
            self.abort()
            message = state.non_finite_message(
                window_loss, where, self.dist.rank, self.agreement.ranks
            )
            raise NonFiniteLossError(message)
        self._open = None
        window.applied = True  # from here on nothing of the window is run again
        self.steps += 1
        try:
            if self.sync == "deferred":
                D.reduce_gradients(self.module, self.dist)
                if getattr(self.model, "broadcast_buffers", False):
                    D.broadcast_buffers(self.module, self.dist)
            stepped = self.guard.update(
                lambda: apply_update(
                    self.optimizer, self.scaler, self.scheduler, self.max_grad_norm, window_loss
                ),
                where,
            )
        finally:  # applied or failed, the window's gradients are gone
            self.optimizer.zero_grad(set_to_none=True)
            self.module.zero_grad(set_to_none=True)
        return StepOutcome(window_loss, state.samples, state.items, stepped)

    def most_steps(self) -> int:
        """The most micro-steps any rank has in the open window (0 without one)."""
        return self._open[2].most_steps if self._open is not None else 0

    def abort(self) -> None:
        """Drop the open window: its gradients are cleared and the model's buffers put back;
        nothing of it reaches the weights."""
        if self._open is not None:
            self._buffers.restore()
        self._open = None
        self.optimizer.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)
        D.drop_unsynced_grads(self.model)


def check_sync(sync: object) -> str:
    if sync not in SYNC_MODES:
        raise ConfigError(f"sync must be one of {', '.join(SYNC_MODES)}; got {sync!r}")
    return str(sync)


def resolve_sync(sync: str, model: nn.Module, info: D.DistInfo) -> str:
    check_sync(sync)
    if not info.active or info.world_size == 1:
        return "deferred"  # one rank: nothing to reduce, no collective in a micro-step
    if D.is_fsdp2(model):
        if sync == "deferred":
            raise ConfigError(
                "sync='deferred' is not available with FSDP2: its gradients are reduce-scattered "
                "by FSDP2 itself in the last micro-step; use sync='auto' or 'overlap'"
            )
        return "overlap"
    return "deferred" if sync == "auto" else sync
