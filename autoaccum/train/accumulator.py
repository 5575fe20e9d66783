"""The accumulating loop: one optimizer step over one window of micro-batches, exactly as one
big batch would give (the weights: :mod:`autoaccum.train.window`). ``fit`` runs it, and so
can your own loop::

    acc = autoaccum.Accumulator(model, optimizer, target_batch=256)
    for window in acc.windows(loader):      # probes on the first window unless planned
        for micro in window:                # the plan's micro-batches, count-weighted
            acc.backward(micro)             # no gradient sync but on the last one
        acc.step()                          # clip, optimizer, scheduler, zero_grad
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from autoaccum import distributed as D
from autoaccum.errors import ConfigError, NonFiniteLossError, check_count, check_positive
from autoaccum.plan import Plan, make_plan
from autoaccum.probing import probe
from autoaccum.probing.oom import free_memory, is_oom
from autoaccum.probing.peaks import DEFAULT_MARGIN, check_margin
from autoaccum.probing.state import preserved_rng
from autoaccum.results import ProbeResult
from autoaccum.train.batches import to_device
from autoaccum.train.data import Window, WindowSource, window_source
from autoaccum.train.losses import CountFn, LossFn, check_loss, resolve_loss
from autoaccum.train.model import (
    check_model,
    check_model_optimizer,
    default_optimizer,
    min_micro,
    model_device,
)
from autoaccum.train.precision import autocast, make_scaler, resolve_precision
from autoaccum.train.resize import Resizer, rechunk
from autoaccum.train.update import apply_update
from autoaccum.train.window import (
    BufferBackup,
    Micro,
    OpenWindow,
    StepOutcome,
    TrainWindow,
    open_window,
)

__all__ = ["Accumulator"]


class Accumulator:
    """Exact gradient accumulation for a model and optimizer, in your loop or in ``fit``.

    ``target_batch`` samples (over all ranks) make one optimizer step. The plan comes from
    :meth:`probe` (the largest micro-batch that fits, on real samples), :meth:`replan`
    (a ceiling you give), or, when neither was called, from a probe on the first window
    that :meth:`windows` yields. ``loss_fn(model, batch)`` returns the *mean* loss over the
    batch's items and ``count_fn(batch)`` how many items that is (defaults: see
    :func:`~autoaccum.train.losses.resolve_loss`). The model must be on its device; in a
    multi-rank run (an initialised process group) a plain module is wrapped in
    DistributedDataParallel, and :attr:`model` is the module to call.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        target_batch: int,
        loss_fn: LossFn | None = None,
        count_fn: CountFn | None = None,
        scheduler: Any = None,
        precision: str = "auto",
        max_grad_norm: float | None = None,
        margin: float = DEFAULT_MARGIN,
        device: torch.device | None = None,
        prefetch: bool = False,
    ) -> None:
        self.module = check_model(model)
        self.target_batch = check_count("target_batch", target_batch)
        self.max_grad_norm = (
            check_positive("max_grad_norm", max_grad_norm) if max_grad_norm is not None else None
        )
        self.margin = check_margin(margin)
        self.dist = D.current()
        make_plan(target_batch, target_batch, self.dist.world_size)  # PlanError before any work
        self.device = device if device is not None else model_device(model)
        self.precision = resolve_precision(precision, self.device)
        self.optimizer = check_model_optimizer(
            model, optimizer if optimizer is not None else default_optimizer(model)
        )
        self.loss_fn, self.count_fn = resolve_loss(loss_fn, count_fn)
        self.scheduler = scheduler
        self.scaler = make_scaler(self.precision, self.device)
        self.prefetch = prefetch
        self.model = D.wrap_model(model, self.dist, self.device)
        self.plan: Plan | None = None
        self.probe_result: ProbeResult | None = None
        self.steps = 0  #: optimizer steps taken or attempted (the windows stepped so far)
        self.resizer = Resizer()  #: the micro-batch's changes in :meth:`train_window`
        self.samples_dropped = 0  #: samples of windows that no micro-batch could hold
        self._source: tuple[Iterable[Any], WindowSource] | None = None
        self._open: tuple[TrainWindow, list[Micro], OpenWindow] | None = None
        self._buffers = BufferBackup()

    # ------------------------------------------------------------------ planning

    @property
    def min_micro(self) -> int:
        return min_micro(self.module)

    def replan(self, max_micro: int) -> Plan:
        """Plan with micro-batches of at most ``max_micro`` samples (no probe)."""
        check_count("max_micro", max_micro)
        per_rank = self.target_batch // self.dist.world_size
        self.plan = make_plan(
            self.target_batch,
            min(max_micro, per_rank),
            self.dist.world_size,
            min_micro=self.min_micro,
        )
        return self.plan

    def probe(self, batch: Any) -> Plan:
        """Probe the largest micro-batch that trains, on the real samples of ``batch``, and
        plan with it. Every rank must call it (the ranks agree on the size); the model's
        state and the random streams are left as they were."""
        info = self.dist
        per_rank = self.target_batch // info.world_size

        def agree(failed: bool) -> bool:
            return D.all_reduce_max(float(failed), info) > 0

        with preserved_rng():
            found = probe(
                self.model,
                batch,
                loss_fn=self.loss_fn,
                optimizer=self.optimizer,
                upper=per_rank,
                precision=self.precision,
                margin=self.margin,
                device=self.device,
                agree=agree if info.active and info.world_size > 1 else None,
            )
        self.probe_result = found
        return self.replan(int(D.all_reduce_min(float(found.max_micro), info)))

    # ------------------------------------------------------------------ data

    def source(self, data: Iterable[Any]) -> WindowSource:
        """The window source of ``data`` (kept, so that epochs share workers and orders)."""
        if self._source is None or self._source[0] is not data:
            info = self.dist
            self._source = (data, window_source(data, rank=info.rank, world_size=info.world_size))
        return self._source[1]

    def windows(
        self, data: Iterable[Any], epoch: int = 0, *, skip: int = 0
    ) -> Iterator[TrainWindow]:
        """The windows of ``data`` for ``epoch``: ``target_batch`` samples each over all ranks
        (the last one of an epoch may be short). Without a plan yet, the first window's
        samples are probed first."""
        source = self.source(data)
        if self.plan is None:
            self.probe(source.sample_batch(self.target_batch // self.dist.world_size))
        assert self.plan is not None  # set by probe()
        agree = source.rank_local and self.dist.active and self.dist.world_size > 1
        for window in source.windows(self.plan, epoch, skip=skip):
            if agree and not D.agree_window(len(window.micro_batches), self.model, self.dist):
                return
            self._dropped(window)
            if window.micro_batches:
                yield TrainWindow(self, window)
        if agree:
            D.agree_window(0, self.model, self.dist)  # tell ranks still holding data to stop

    def _dropped(self, window: Window) -> None:
        if not window.dropped:
            return
        self.samples_dropped += window.dropped
        warnings.warn(
            f"{window.dropped} sample(s) of window {window.index} of epoch {window.epoch} were "
            f"not trained: {window.dropped_because}. FitResult.samples_dropped counts them",
            UserWarning,
            stacklevel=3,
        )

    # ------------------------------------------------------------------ the window

    def begin(self, window: TrainWindow) -> list[Micro]:
        """Count the window's items (all ranks) and weigh its micro-batches; called by iterating
        a :class:`TrainWindow`. Starting a new window while one is open is an error."""
        if self._open is not None and self._open[0] is not window:
            index = self._open[0].index
            self.abort()
            raise ConfigError(
                f"a new window was started while window {index} still waited for step(): call "
                "acc.step() after the micro-steps of each window (that window was dropped)"
            )
        micros, state = open_window(
            window, self.count_fn, self.dist, self.device, self.where(window.data)
        )
        self._buffers.save(self.module)
        if self.prefetch:
            state.upcoming = to_device(micros[0].batch, self.device, non_blocking=True)
        self._open = (window, micros, state)
        return micros

    def where(self, window: Window) -> str:
        return f"optimizer step {self.steps + 1} (epoch {window.epoch}, window {window.index})"

    def backward(self, micro: Micro) -> torch.Tensor:
        """Forward and backward of one micro-batch, weighted by its share of the window's
        items; the gradient is reduced across ranks on the last micro-step only. Returns the
        micro-batch's mean loss, detached."""
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
        batch = (
            state.upcoming if state.upcoming is not None else to_device(micro.batch, self.device)
        )
        state.upcoming = None
        if self.prefetch and not micro.last:
            state.upcoming = to_device(
                micros[micro.index + 1].batch, self.device, non_blocking=True
            )
        where = f"{self.where(micro.window.data)}, micro-batch {micro.index + 1}"
        try:
            with D.gradient_sync(self.model, enabled=micro.last):
                with autocast(self.precision, self.device):
                    loss = check_loss(self.loss_fn(self.model, batch), where)
                if loss.dtype in (torch.float16, torch.bfloat16):
                    loss = loss.float()  # weight in fp32: bf16 has 8 bits of mantissa
                self.scaler.scale(loss * micro.weight).backward()  # type: ignore[no-untyped-call]
        except BaseException:
            self.abort()
            raise
        detached = loss.detach()
        del loss, batch
        state.add(detached, micro.count)
        return detached

    def step(self) -> StepOutcome:
        """Apply the window: clip, optimizer step, scheduler step, zero the gradients.

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
        try:
            window_loss = state.window_loss(self.dist)
            if not math.isfinite(window_loss):
                raise NonFiniteLossError(state.non_finite_message(window_loss, where, self.dist))
        except BaseException:
            self.abort()
            raise
        self._open = None
        self.steps += 1
        stepped = apply_update(
            self.optimizer, self.scaler, self.scheduler, self.max_grad_norm, window_loss
        )
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(window_loss, state.samples, state.items, stepped)

    def abort(self) -> None:
        """Drop the open window: its gradients are cleared and the model's buffers put back;
        nothing of it reaches the weights."""
        if self._open is not None:
            self._buffers.restore()
        self._open = None
        self.optimizer.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)
        D.drop_unsynced_grads(self.model)

    # ------------------------------------------------------------------ robust path

    def train_window(self, window: TrainWindow) -> StepOutcome:
        """All of ``window``'s micro-steps and its optimizer step; ``fit`` runs this.

        A single-process run that runs out of memory in a micro-step re-runs the window with
        a smaller micro-batch (nothing of it had reached the weights; the gradient is
        count-weighted, so the step is the same) and keeps the smaller plan.
        """
        assert self.plan is not None  # a TrainWindow comes from windows(), which plans
        batches = rechunk(window.data.micro_batches, self.plan)
        current = (
            window if list(batches) == list(window.data.micro_batches) else _with(window, batches)
        )
        while not self._micro_steps(current):
            # outside the except block: the traceback no longer pins the failed tensors
            free_memory(self.device)
            self.plan = self.resizer.after_oom(
                self.plan, window.data, self.steps + 1, self.where(window.data)
            )
            current = _with(window, rechunk(current.data.micro_batches, self.plan))
        return self.step()

    def _micro_steps(self, window: TrainWindow) -> bool:
        """Forward and backward of every micro-batch; False after an out-of-memory error that
        this run can recover from (the window was dropped), any other error propagates."""
        try:
            for micro in window:
                self.backward(micro)
        except Exception as exc:
            if not is_oom(exc) or self.dist.world_size > 1:
                raise
            return False
        return True


def _with(window: TrainWindow, micro_batches: list[Any]) -> TrainWindow:
    """``window`` with its samples cut into other micro-batches."""
    data = dataclasses.replace(window.data, micro_batches=tuple(micro_batches))
    return TrainWindow(window.accumulator, data)
