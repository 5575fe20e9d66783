"""One window, end to end: the micro-steps of one optimizer step, the ranks' agreement on each,
the out-of-memory retry, the gradient reduction and the optimizer step, in the order they
happen. The weights that make the step exact are :mod:`autoaccum.train.weights`'.

On several ranks one window exchanges these words (:mod:`autoaccum.step.ranks`), in order::

    1          counting a window's items   open()         items and samples over all ranks,
                                                           each rank's micro-steps
    2 … n+1    a micro-step                micro_steps()  after each: out of memory? failed?
                                                           (a rank with fewer micro-steps says
                                                           "nothing" until the longest is done)
    n+2        the window's loss           step()         non-finite, or no memory for the
                                                           reduction: dropped on every rank
               (deferred sync: the gradients' all-reduce, now that every rank succeeded)
    n+3        the optimizer update        step()         did every rank's update succeed?

and, between windows, the stop check after the callbacks (:mod:`autoaccum.train.run`). An
out-of-memory error agreed at 2 … n+1 drops the window on every rank; :meth:`WindowTrainer.train`
re-cuts it smaller and starts again at 1. In one process every exchange is free.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from autoaccum import distributed as D
from autoaccum.errors import ConfigError, DistributedError, NonFiniteLossError
from autoaccum.plan import Plan
from autoaccum.step.batches import to_device
from autoaccum.step.losses import CountFn, LossFn, check_loss
from autoaccum.step.oom import free_memory, is_oom
from autoaccum.step.precision import autocast
from autoaccum.step.ranks import Ranks
from autoaccum.train import weights as W
from autoaccum.train.data.cut import Window
from autoaccum.train.resize import Resizer, rechunk
from autoaccum.train.update import agreed_update, ready_reduction
from autoaccum.train.weights import BufferBackup, Gradients, Micro, OpenWindow, StepOutcome

__all__ = ["TrainWindow", "WindowTrainer"]


class TrainWindow:
    """A window of data bound to the trainer that runs it; iterating it opens it (exchange 1)
    and yields its :class:`~autoaccum.train.weights.Micro` s, weighted before any backward."""

    def __init__(self, trainer: WindowTrainer, data: Window) -> None:
        self.trainer = trainer
        self.data = data
        self._origin = self  #: the window as windows() yielded it (recut ones share its fate)
        self._applied = False

    epoch = property(lambda self: self.data.epoch)
    index = property(lambda self: self.data.index)
    samples = property(lambda self: self.data.samples)

    def __len__(self) -> int:
        return len(self.data.micro_batches)

    def __iter__(self) -> Iterator[Micro]:
        return iter(self.trainer.open(self))

    @property
    def applied(self) -> bool:
        """step() took this window's samples to the optimizer: they never train again."""
        return self._origin._applied

    @applied.setter
    def applied(self, value: bool) -> None:
        self._origin._applied = value

    def recut(self, micro_batches: Sequence[Any]) -> TrainWindow:
        """This window cut into other micro-batches (itself when unchanged); one fate."""
        if list(micro_batches) == list(self.data.micro_batches):
            return self
        data = dataclasses.replace(self.data, micro_batches=tuple(micro_batches))
        recut = TrainWindow(self.trainer, data)
        recut._origin = self._origin
        return recut


@dataclasses.dataclass(eq=False)
class WindowTrainer:
    """Runs one window at a time. ``module`` is the user's model; ``model`` what training
    calls (DDP's wrapper, an FSDP2 module, or the module itself); :attr:`forward_model` what a
    micro-step's forward calls."""

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
    ranks: Ranks
    resizer: Resizer
    steps: int = 0  #: optimizer steps taken or attempted (the windows stepped so far)
    _open: tuple[TrainWindow, list[Micro], OpenWindow] | None = None
    _buffers: BufferBackup = dataclasses.field(default_factory=BufferBackup)
    _grads: Gradients = dataclasses.field(default_factory=Gradients)
    _prepared: bool = False  #: the count function's ``prepare`` has run

    @property
    def forward_model(self) -> nn.Module:
        """DDP's inner module when :meth:`step` reduces the gradients (deferred sync: no DDP
        forward, hence no collective inside a micro-step), else :attr:`model`."""
        if self.sync == "deferred" and isinstance(self.model, nn.parallel.DistributedDataParallel):
            return self.model.module  # type: ignore[no-any-return]
        return self.model

    def prepare_count(self, batch: Any) -> None:
        """Let the count read off the model what it needs, once (labels shifted?)."""
        prepare = getattr(self.count_fn, "prepare", None)
        if callable(prepare) and not self._prepared:
            prepare(self.forward_model, to_device(batch, self.device))
            self._prepared = True

    def where(self, window: Window) -> str:
        return f"optimizer step {self.steps + 1} (epoch {window.epoch}, window {window.index})"

    # ------------------------------------------------------------------ 1: open the window

    def open(self, window: TrainWindow) -> list[Micro]:
        """Count the window's items on every rank (exchange 1) and weigh its micro-batches
        (an applied window, or an open one iterated again, is an error)."""
        if window.applied:
            raise ConfigError(W.applied_twice(window.index, window.epoch))
        if self._open is not None and (problem := W.reopened(*self._open[::2], window)):
            self.abort()
            raise ConfigError(problem)
        self._grads.clear(self.module)  # nothing left by a stray backward before
        where, batches = self.where(window.data), window.data.micro_batches

        def count() -> list[float]:
            if batches:
                self.prepare_count(batches[0])
            return W.count_window(batches, self.count_fn, where)

        counts = self.ranks.run(count, where)
        agreed = self.ranks.agree(  # exchange 1
            "counting a window's items",
            items=sum(counts),
            samples=W.window_samples(batches) - window.data.continued,
            each=len(batches),
            where=where,
        )
        W.check_items(agreed.items, where)
        every = self.sync == "overlap"  # every rank runs every micro-step: its collectives
        micros, state = W.open_window(
            window,
            counts,
            agreed.items,
            agreed.samples,
            self.ranks.size,
            self.device,
            steps=max(agreed.each) if every else None,
        )
        state.most_steps = max(agreed.each)
        self._buffers.save(self.module)
        if self.prefetch:
            state.prefetch(micros, -1, self.device)
        self._open = (window, micros, state)
        return micros

    # ------------------------------------------------------------------ one micro-step

    def backward(self, micro: Micro) -> torch.Tensor:
        """Forward and backward of one micro-batch weighted by its share of the window's items;
        its mean loss, detached. One without items adds nothing (skipped where it can be)."""
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
            run, weight = W.stand_in(micros, self.where(micro.window.data)), 0.0
        prefetched = state.prefetch(micros, micro.index, self.device) if self.prefetch else None
        if micro.count == 0 and run is micro:  # nothing to add, and nothing needs it to run
            state.skip()
            return torch.zeros(())
        own = prefetched if prefetched is not None and run is micro else None
        batch = own if own is not None else to_device(run.batch, self.device)
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

    def _sync(self, last: bool) -> AbstractContextManager[None]:
        """Overlapped sync: DDP's / FSDP2's reduction runs in the last micro-step only."""
        return D.gradient_sync(self.model, last) if self.sync == "overlap" else nullcontext()

    # ------------------------------------------------------------------ 2 … n+1: every micro-step

    def micro_steps(self, window: TrainWindow) -> tuple[bool, dict[str, float]] | None:
        """Every micro-step of ``window``, each agreed on by every rank (exchanges 2 … n+1):
        None when all succeeded; after an out-of-memory error on any rank (the window dropped
        on every rank), whether this rank ran out, and what its error tells about the size to
        retry with."""
        where = self.where(window.data)
        for micro in window:
            failure: BaseException | None = None
            reading: dict[str, float] | None = None
            try:
                self.backward(micro)
            except Exception as exc:
                if is_oom(exc):  # read while the failed step's tensors are still alive
                    reading = self.resizer.reading(str(exc), self.device)
                else:
                    failure = exc
            if not self.ranks.multi and failure is not None:
                raise failure
            here = f"{where}, micro-batch {micro.index + 1}"
            agreed = self.ranks.agree(
                "a micro-step", failure=failure, where=here, oom=reading is not None
            )
            if agreed.oom:
                return self._drop_after_oom(agreed.oom, reading, here)
        state = self._open[2] if self._open is not None else None
        for _ in range(state.most_steps - state.micros if state else 0):  # fewer: wait
            agreed = self.ranks.agree("a micro-step", where=where)
            if agreed.oom:
                return self._drop_after_oom(agreed.oom, None, where)
        return None

    def _drop_after_oom(
        self, ranks_out: int, reading: dict[str, float] | None, where: str
    ) -> tuple[bool, dict[str, float]]:
        """Drop the window on this rank after ``ranks_out`` ranks ran out of memory, where
        re-running it is safe; otherwise stop every rank with a clear error."""
        self.abort()  # every rank drops the window (the failing one already has)
        if self.ranks.multi and self.sync != "deferred":
            raise DistributedError(
                f"{ranks_out} rank(s) ran out of memory at {where} with sync='overlap' (FSDP2, "
                "or DDP's overlapped reduction), where the other ranks may be inside a "
                "collective that the failed rank will never join: no rank can safely re-run "
                "the window, so every rank stops. Use DDP with sync='deferred' to recover from "
                "such errors, or a smaller max_micro"
            )
        free_memory(self.device)  # outside the except block: no frame pins the tensors
        return reading is not None, reading or {}

    # ------------------------------------------------------------------ n+2, n+3: the step

    def step(self) -> StepOutcome:
        """Apply the window: agree on its loss (n+2), reduce the gradients (deferred sync),
        clip, step the optimizer and the scheduler, agree on the update (n+3); its gradients
        are gone afterwards. A partial window (mis-weighted) or a non-finite loss is an error
        that applies nothing; once the optimizer stepped, nothing of it runs again."""
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
        reduce, failure = ready_reduction(self.module, self.ranks.info, self.sync, where)
        try:
            agreed = self.ranks.agree(
                "the window's loss", failure=failure, loss=float(state.loss_sum), where=where
            )
        except BaseException:
            self.abort()
            raise
        window_loss = agreed.loss / state.items
        if not math.isfinite(window_loss):
            self.abort()
            rank, size = self.ranks.rank, self.ranks.size
            raise NonFiniteLossError(state.non_finite_message(window_loss, where, rank, size))
        self._open = None
        window.applied = True  # from here on nothing of the window is run again
        self.steps += 1
        try:
            reduce()
            if self.sync == "deferred" and getattr(self.model, "broadcast_buffers", False):
                D.broadcast_buffers(self.module, self.ranks.info)
            stepped = agreed_update(  # exchange n+3: a rank whose update failed stops all
                self.optimizer,
                self.scaler,
                self.scheduler,
                self.max_grad_norm,
                window_loss,
                ranks=self.ranks,
                where=where,
            )
        finally:  # applied or failed, the window's gradients are gone
            self.optimizer.zero_grad(set_to_none=True)
            self._grads.clear(self.module)
        return StepOutcome(window_loss, state.samples, state.items, stepped)

    def abort(self) -> None:
        """Drop the open window: gradients cleared, buffers put back, nothing applied."""
        if self._open is not None:
            self._buffers.restore()
        self._open = None
        self.optimizer.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)
        D.drop_unsynced_grads(self.model)

    # ------------------------------------------------------------------ the robust path

    def train(self, window: TrainWindow, plan: Plan) -> tuple[StepOutcome, Plan]:
        """All of ``window``'s micro-steps and its optimizer step under ``plan``; the outcome
        and the next window's plan. After an out-of-memory error on any rank the window is
        dropped on every rank and re-run, smaller on the ranks that ran out: nothing of it had
        reached the weights, and the gradient is count-weighted, so the step is the same."""
        current = window.recut(rechunk(window.data.micro_batches, plan))
        while (oom := self.micro_steps(current)) is not None:
            here, reading = oom  # only a rank that ran out shrinks; the others run it again
            if here:
                where = self.where(window.data)
                plan = self.resizer.after_oom(plan, window.data, self.steps + 1, where, **reading)
            current = window.recut(rechunk(current.data.micro_batches, plan))
        outcome = self.step()
        return outcome, self.resizer.after_window(plan, window.data, self.steps)
