"""The accumulating loop: one optimizer step over one window of micro-batches, exactly as one
big batch would give (the weights: :mod:`autoaccum.train.window`). ``fit`` runs it, and so
can your own loop::

    acc = autoaccum.Accumulator(model, optimizer, target_batch=256)
    for window in acc.windows(loader):      # probes on the first window unless planned
        for micro in window:                # the plan's micro-batches, count-weighted
            acc.backward(micro)             # no gradient sync but where the plan reduces
        acc.step()                          # clip, optimizer, scheduler, zero_grad

or ``acc.train_window(window)`` for the robust path that survives out-of-memory errors.
"""

from __future__ import annotations

import dataclasses
import datetime
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from autoaccum import distributed as D
from autoaccum.errors import (
    DistributedError,
    check_callable,
    check_count,
    check_positive,
)
from autoaccum.plan import Plan, make_plan
from autoaccum.probing.fastest import check_choose
from autoaccum.probing.peaks import DEFAULT_MARGIN, check_margin
from autoaccum.probing.state import preserved_rng
from autoaccum.probing.trials import probe
from autoaccum.results import ProbeResult
from autoaccum.train.agree import Agreement
from autoaccum.train.counting import resolve_loss
from autoaccum.train.data import Window, WindowSource, window_source
from autoaccum.train.data.heaviest import SizeFn
from autoaccum.train.guard import Guard
from autoaccum.train.losses import CountFn, LossFn
from autoaccum.train.model import (
    check_model,
    check_model_optimizer,
    default_optimizer,
    min_micro,
    model_device,
)
from autoaccum.train.precision import make_scaler, resolve_precision
from autoaccum.train.resize import Resizer, rechunk
from autoaccum.train.stepping import Stepping, resolve_sync
from autoaccum.train.window import (
    BufferBackup,
    Micro,
    OpenWindow,
    StepOutcome,
    TrainWindow,
)

__all__ = ["Accumulator"]


class Accumulator(Stepping):
    """Exact gradient accumulation for a model and optimizer, in your loop or in ``fit``.

    ``target_batch`` samples (over all ranks) make one optimizer step. The plan comes from
    :meth:`probe` (the largest micro-batch that fits, on real samples), :meth:`replan`
    (a ceiling you give), or, when neither was called, from a probe on the first window
    that :meth:`windows` yields. ``loss_fn(model, batch)`` returns the *mean* loss over the
    batch's items and ``count_fn(batch)`` how many items that is (defaults:
    :func:`~autoaccum.train.counting.resolve_loss`). The model must be on its device; in a
    multi-rank run (an initialised process group) a plain module is wrapped in
    DistributedDataParallel, and :attr:`model` is the module to call; every rank creates its
    accumulator at the same point (the ranks' exchange group is made then), and
    :meth:`close` releases that group.

    ``sync`` says how a multi-rank window reduces its gradients. ``"deferred"`` (the default
    for DDP): every micro-step runs without gradient sync, and once every rank has said its
    micro-steps succeeded the gradients are averaged in one all-reduce; an out-of-memory
    error on any rank at any micro-step is then recovered on every rank. ``"overlap"``: DDP's
    or FSDP2's own reduction, overlapped with the last micro-step's backward (faster on slow
    links; an out-of-memory error inside that backward stops every rank with a clear error,
    as does any with FSDP2, whose every forward gathers parameters). FSDP2 is always
    ``"overlap"``.
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
        sync: str = "auto",
        timeout: datetime.timedelta | None = None,
        size_fn: SizeFn | None = None,
        choose: str = "auto",
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
        self.sync = resolve_sync(sync, self.model, self.dist)
        self.choose = check_choose(choose)
        self.size_fn = (
            check_callable("size_fn", size_fn, "size_fn(sample) -> int") if size_fn else None
        )
        self.plan: Plan | None = None
        self.probe_result: ProbeResult | None = None
        self.steps = 0  #: optimizer steps taken or attempted (the windows stepped so far)
        self.resizer = Resizer()  #: the micro-batch's changes in :meth:`train_window`
        self.samples_dropped = 0  #: samples of windows that no micro-batch could hold
        self.agreement = Agreement(self.dist, timeout)
        self.guard = Guard(self.agreement)
        self._source: tuple[Iterable[Any], WindowSource] | None = None
        self._open: tuple[TrainWindow, list[Micro], OpenWindow] | None = None
        self._buffers = BufferBackup()
        self._prepared = False

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
        if self.resizer.ceiling is None:
            self.resizer.ceiling = self.plan.max_micro
        return self.plan

    def probe(self, batch: Any, probed_on: str = "") -> Plan:
        """Probe the largest micro-batch that trains, on the real samples of ``batch`` (what
        they are, in ``probed_on``), and plan with it. Every rank must call it (the ranks
        agree on the size); the model's state and the random streams are left as they were."""
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
                choose=self.choose,
                slowest=lambda seconds: D.all_reduce_max(seconds, info),
            )
        self.probe_result = dataclasses.replace(found, probed_on=probed_on)
        return self.replan(int(D.all_reduce_min(float(found.max_micro), info)))

    def probe_data(self, data: Iterable[Any]) -> Plan:
        """Probe on the heaviest samples of ``data`` where it can be scanned (a DataLoader
        over a map-style dataset; weighed by ``size_fn``), else on its first window."""
        share = self.target_batch // self.dist.world_size
        return self.probe(*self.source(data).probe_batch(share, self.size_fn))

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
        samples are probed first. With rank-local data the ranks agree before each window
        that all of them have one; the epoch ends for all when the first runs out."""
        source = self.source(data)
        if self.plan is None:
            self.probe_data(data)
        assert self.plan is not None  # set by probe()
        windows = self.guard.iterate(source.windows(self.plan, epoch, skip=skip))
        for window in windows:
            if source.rank_local and not self._all_have(len(window.micro_batches)):
                return
            self._dropped(window)
            if window.micro_batches:
                yield TrainWindow(self, window)
        if source.rank_local:
            self._all_have(0)  # tell the ranks still holding data to stop

    def _all_have(self, micro_steps: int) -> bool:
        agreed = self.guard.agree(missing=micro_steps == 0, steps=micro_steps)
        if agreed.missing:
            return False
        if not agreed.steps_equal and D.is_fsdp2(self.model):
            raise DistributedError(
                f"the ranks' windows have {min(agreed.steps)} to {max(agreed.steps)} "
                f"micro-batches (rank by rank: {list(agreed.steps)}): with rank-local "
                "data (not a DataLoader over a map-style dataset) the ranks hold different "
                "numbers of samples in this window, which an FSDP2 model cannot train (every "
                "micro-step all-gathers its parameters on all ranks). Give every rank the same "
                "number of samples, or pass a DataLoader and let autoaccum shard it"
            )
        return True

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

    # ------------------------------------------------------------------ robust path

    def train_window(self, window: TrainWindow) -> StepOutcome:
        """All of ``window``'s micro-steps and its optimizer step; ``fit`` runs this.

        After an out-of-memory error in a micro-step — on this rank or, agreed, on any rank —
        the window is dropped and re-run on every rank with a smaller micro-batch (nothing of
        it had reached the weights, and the gradient is count-weighted, so the step is the
        same); the smaller plan is kept, and grows back after a run of clean windows.
        """
        assert self.plan is not None  # a TrainWindow comes from windows(), which plans
        current = _with(window, rechunk(window.data.micro_batches, self.plan))
        while (oom := self.guard.micro_steps(self, current)) is not None:
            self.plan = self.resizer.after_oom(
                self.plan, window.data, self.steps + 1, self.where(window.data), **oom
            )
            current = _with(window, rechunk(current.data.micro_batches, self.plan))
        outcome = self.step()
        self.plan = self.resizer.after_window(self.plan, window.data, self.steps)
        return outcome

    def close(self) -> None:
        """Release the ranks' exchange group (``fit`` calls this; so should your own loop)."""
        self.agreement.close()


def _with(window: TrainWindow, micro_batches: list[Any]) -> TrainWindow:
    """``window`` with its samples cut into other micro-batches (itself when unchanged)."""
    if list(micro_batches) == list(window.data.micro_batches):
        return window
    data = dataclasses.replace(window.data, micro_batches=tuple(micro_batches))
    return TrainWindow(window.accumulator, data)
