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
    check_timeout,
)
from autoaccum.plan import Plan, check_target, make_plan
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
    warn_outside_optimizer,
)
from autoaccum.train.precision import make_scaler, resolve_precision
from autoaccum.train.resize import Resizer, rechunk
from autoaccum.train.stepping import Stepping, check_sync, resolve_sync
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
    for DDP): micro-steps run without gradient sync, and once every rank has said they
    succeeded the gradients are averaged in one all-reduce, so an out-of-memory error on any
    rank is recovered on every rank. ``"overlap"``: DDP's or FSDP2's own reduction in the last
    micro-step's backward (an out-of-memory error there stops every rank with a clear error).
    FSDP2 is always ``"overlap"``.
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
        timeout: float | datetime.timedelta | None = None,
        size_fn: SizeFn | None = None,
        choose: str = "auto",
    ) -> None:
        self.dist = D.current()
        limit = check_timeout(timeout) if timeout is not None else None
        self.agreement = Agreement(self.dist, limit)
        self.guard = Guard(self.agreement)
        try:  # nothing here talks to the other ranks: a rank that fails tells them below
            self.module = check_model(model)
            self.target_batch = check_count("target_batch", target_batch)
            self.max_grad_norm = (
                check_positive("max_grad_norm", max_grad_norm)
                if max_grad_norm is not None
                else None
            )
            self.margin = check_margin(margin)
            check_target(target_batch, self.dist.world_size)  # PlanError before any work
            self.device = device if device is not None else model_device(model)
            self.precision = resolve_precision(precision, self.device)
            self.optimizer = check_model_optimizer(
                model, optimizer if optimizer is not None else default_optimizer(model)
            )
            self.loss_fn, self.count_fn = resolve_loss(loss_fn, count_fn)
            self.choose = check_choose(choose)
            self.size_fn = (
                check_callable("size_fn", size_fn, "size_fn(sample) -> int") if size_fn else None
            )
            check_sync(sync)
        except Exception as exc:
            self.guard.give_up(exc, "setting up the accumulator")
            self.close()
            raise
        try:  # every rank: the same target and settings, or every rank stops
            self.guard.same_settings(
                target_batch=self.target_batch,
                precision=self.precision,
                sync=sync,
                choose=self.choose,
                margin=self.margin,
                max_grad_norm=self.max_grad_norm,
            )
        except BaseException:
            self.close()
            raise
        warn_outside_optimizer(model, self.optimizer)
        self.scheduler = scheduler
        self.scaler = make_scaler(self.precision, self.device)
        self.prefetch = prefetch
        self.model = D.wrap_model(model, self.dist, self.device)
        self.sync = resolve_sync(sync, self.model, self.dist)
        self.plan: Plan | None = None
        self.probe_result: ProbeResult | None = None
        self.steps = 0  #: optimizer steps taken or attempted (the windows stepped so far)
        self.resizer = Resizer()  #: the micro-batch's changes in :meth:`train_window`
        self.samples_dropped = 0  #: samples of windows that no micro-batch could hold
        self._warned_small = False
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

    def probe(self, batch: Any, probed_on: str = "", *, upper: int | None = None) -> Plan:
        """Probe the largest micro-batch that trains, on the real samples of ``batch`` (what
        they are, in ``probed_on``), and plan with it; no larger than ``upper`` (default: this
        rank's share of the target). Every rank must call it (the ranks agree on every trial
        and take the smallest ceiling); the model's state and the random streams are left as
        they were."""
        per_rank = self.target_batch // self.dist.world_size
        if upper is not None:
            per_rank = min(per_rank, check_count("upper", upper))
        point = "probing the micro-batch"

        def agree(failed: bool) -> bool:
            return self.guard.agree(point, oom=failed).oom > 0

        def run() -> ProbeResult:
            with preserved_rng():
                return probe(
                    self.model,
                    batch,
                    loss_fn=self.loss_fn,
                    optimizer=self.optimizer,
                    upper=per_rank,
                    precision=self.precision,
                    margin=self.margin,
                    device=self.device,
                    agree=agree if self.guard.multi else None,
                    choose=self.choose,
                )

        found = self.guard.run(run, "probing the micro-batch")
        self.probe_result = dataclasses.replace(found, probed_on=probed_on)
        ceilings = self.guard.agree(point, each=found.max_micro).each
        return self.replan(min(ceilings))

    def probe_data(self, data: Iterable[Any]) -> Plan:
        """Probe on the heaviest samples of ``data`` where it can be scanned (a DataLoader
        over a map-style dataset; weighed by ``size_fn``), else on its first window."""
        share = self.target_batch // self.dist.world_size
        source = self.source(data)
        known = source.samples_per_epoch()
        if known:  # no micro-batch can hold more than a rank's whole epoch
            share = min(share, known)
        batch, what = self.guard.run(
            lambda: source.probe_batch(share, self.size_fn), "reading the probe's samples"
        )
        return self.probe(batch, what, upper=share)

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
        self._start_epoch(source, self.plan)
        windows = self.guard.iterate(source.windows(self.plan, epoch, skip=skip))
        for window in windows:
            self._dropped(window)  # counted and warned about on every path, then trained
            if source.rank_local and not self._all_have(len(window.micro_batches)):
                return
            if window.micro_batches:
                yield TrainWindow(self, window)
        if source.rank_local:
            self._all_have(0)  # tell the ranks still holding data to stop

    def _start_epoch(self, source: WindowSource, plan: Plan) -> None:
        """Every rank starts the epoch together; ranks that share one dataset (a DataLoader
        autoaccum shards) must hold the same one, or their windows would part ways."""
        shared = None if source.rank_local else source.dataset_size()
        agreed = self.guard.agree(
            "starting an epoch", each=-1 if shared is None else shared, where="starting an epoch"
        )
        if shared is not None and not agreed.each_equal:
            lengths = ", ".join(f"rank {r}: {n}" for r, n in enumerate(agreed.each))
            raise DistributedError(
                f"the ranks' DataLoaders hold datasets of different lengths ({lengths}): "
                "autoaccum shards one dataset among the ranks, so every rank must pass a "
                "DataLoader over the same dataset. For data each rank reads on its own, pass an "
                "iterable of batches (its epoch ends when the first rank runs out)"
            )
        samples = source.samples_per_epoch()
        if samples and samples < plan.per_rank and not self._warned_small:
            self._warned_small = True
            total = samples * self.dist.world_size
            warnings.warn(
                f"target_batch {plan.target_batch} is larger than the whole epoch (about "
                f"{total} samples over {self.dist.world_size} rank(s)): every optimizer step "
                f"trains on all of it, one short window per epoch. Lower target_batch to at most "
                f"{total} for several steps per epoch",
                UserWarning,
                stacklevel=4,
            )

    def _all_have(self, micro_steps: int) -> bool:
        agreed = self.guard.agree(
            "checking that every rank has a window (rank-local data)",
            missing=micro_steps == 0,
            each=micro_steps,
        )
        if agreed.missing:
            return False
        if not agreed.each_equal and D.is_fsdp2(self.model):
            raise DistributedError(
                f"the ranks' windows have {min(agreed.each)} to {max(agreed.each)} "
                f"micro-batches (rank by rank: {list(agreed.each)}): with rank-local "
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
        current = window.recut(rechunk(window.data.micro_batches, self.plan))
        while (oom := self.guard.micro_steps(self, current)) is not None:
            self.plan = self.resizer.after_oom(
                self.plan, window.data, self.steps + 1, self.where(window.data), **oom
            )
            current = window.recut(rechunk(current.data.micro_batches, self.plan))
        outcome = self.step()
        self.plan = self.resizer.after_window(self.plan, window.data, self.steps)
        return outcome

    def close(self) -> None:
        """Release the ranks' exchange group (``fit`` calls this; so should your own loop)."""
        self.agreement.close()
