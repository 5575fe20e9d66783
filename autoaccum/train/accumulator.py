"""The accumulating loop: one optimizer step over one window of micro-batches, exactly as one
big batch would give (one window end to end: :mod:`autoaccum.train.window`). ``fit`` runs it,
and so can your own loop::

    acc = autoaccum.Accumulator(model, optimizer, target_batch=256)
    for window in acc.windows(loader):      # probes on the heaviest samples unless planned
        for micro in window:                # the plan's micro-batches, count-weighted
            acc.backward(micro)             # no gradient sync but where the plan reduces
        acc.step()                          # clip, optimizer, scheduler, zero_grad

or ``acc.train_window(window)`` for the robust path that survives out-of-memory errors.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from autoaccum import distributed as D
from autoaccum.errors import check_count, check_timeout
from autoaccum.memory.peaks import DEFAULT_MARGIN
from autoaccum.plan import Plan
from autoaccum.probing.trials import probe
from autoaccum.results import ProbeResult
from autoaccum.schedule import Schedule
from autoaccum.step.losses import CountFn, LossFn
from autoaccum.step.model import (
    min_micro,
    warn_outside_optimizer,
)
from autoaccum.step.precision import make_scaler
from autoaccum.step.ranks import Ranks
from autoaccum.step.rng import preserved_rng
from autoaccum.train import loop_state
from autoaccum.train.checkpoint import Saved
from autoaccum.train.data import WindowSource, as_source
from autoaccum.train.data.agreed import epoch_windows, warn_dropped, warn_larger_than_data
from autoaccum.train.data.cut import Window
from autoaccum.train.data.heaviest import SizeFn
from autoaccum.train.data.tokens import TokenWindows, token_upper
from autoaccum.train.delegate import Delegated
from autoaccum.train.planner import Planner
from autoaccum.train.resize import Resizer
from autoaccum.train.setup import check_arguments
from autoaccum.train.weights import Micro, StepOutcome
from autoaccum.train.window import TrainWindow, WindowTrainer

__all__ = ["Accumulator"]


class Accumulator:
    """Exact gradient accumulation for a model and optimizer, in your loop or in ``fit``.

    ``target_batch`` samples (over all ranks) make one optimizer step. The plan comes from
    :meth:`probe` (the largest micro-batch that fits, on real samples), :meth:`replan`
    (a ceiling you give), or, when neither was called, from a probe on the heaviest samples
    of the data :meth:`windows` reads. ``loss_fn(model, batch)`` returns the *mean* loss over
    the batch's items and ``count_fn(batch)`` how many items that is (defaults:
    :func:`~autoaccum.step.counting.resolve_loss`; a loss module such as
    ``nn.CrossEntropyLoss()`` is applied to ``(inputs, targets)`` batches). The model must be
    on its device. In a multi-rank run (an initialised process group) every rank creates its
    accumulator at the same point (the ranks' exchange group is made then, and the ranks
    check that they share the target and settings); :meth:`close` releases that group.

    The model has three views: :attr:`module` is your model; :attr:`model` what training
    calls (a DistributedDataParallel wrapper in a multi-rank run, an FSDP2 module as it is,
    else the module); :attr:`forward_model` what a micro-step's forward calls (DDP's inner
    module under deferred sync, so that no collective runs inside a micro-step).

    ``sync`` says how a multi-rank window reduces its gradients. ``"deferred"`` (the default
    for DDP): micro-steps run without gradient sync, and once every rank has said they
    succeeded the gradients are averaged in one all-reduce, so an out-of-memory error on any
    rank is recovered on every rank. ``"overlap"``: DDP's or FSDP2's own reduction in the last
    micro-step's backward (an out-of-memory error there stops every rank with a clear error).
    FSDP2 is always ``"overlap"``. ``timeout`` (seconds) bounds the ranks' exchanges.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        target_batch: int | Schedule | None = None,
        target_tokens: int | Schedule | None = None,
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
        self.ranks = Ranks(self.dist, check_timeout(timeout) if timeout is not None else None)
        try:  # nothing here talks to the other ranks: a rank that fails tells them below
            checked = check_arguments(
                model,
                optimizer,
                target_batch=target_batch,
                target_tokens=target_tokens,
                world_size=self.dist.world_size,
                loss_fn=loss_fn,
                count_fn=count_fn,
                max_grad_norm=max_grad_norm,
                margin=margin,
                device=device,
                precision=precision,
                choose=choose,
                size_fn=size_fn,
            )
            D.check_sync(sync)
        except Exception as exc:
            self.ranks.give_up(exc, "setting up the accumulator")
            self.close()
            raise
        try:  # every rank: the same target and settings, or every rank stops
            self.ranks.same_settings(**checked.settings(sync))
        except BaseException:
            self.close()
            raise
        self.schedule, self.margin = checked.schedule, checked.margin
        self.tokens = checked.tokens  #: the target counts loss tokens (target_tokens)
        self.choose, self.size_fn = checked.choose, checked.size_fn
        module, dev, prec, opt = (
            checked.module,
            checked.device,
            checked.precision,
            checked.optimizer,
        )
        warn_outside_optimizer(model, opt)
        wrapped = D.wrap_model(model, self.dist, dev)
        self.trainer = WindowTrainer(
            module=module,
            model=wrapped,
            optimizer=opt,
            scheduler=scheduler,
            scaler=make_scaler(prec, dev),
            loss_fn=checked.loss_fn,
            count_fn=checked.count_fn,
            device=dev,
            precision=prec,
            max_grad_norm=checked.max_grad_norm,
            prefetch=prefetch,
            sync=D.resolve_sync(sync, wrapped, self.dist),
            ranks=self.ranks,
            resizer=Resizer(),
        )
        self.planner = Planner(
            self.schedule, self.dist.world_size, self.dist.rank, min_micro(module), self.resizer
        )
        self.planner.tokens = self.tokens
        self.probe_result: ProbeResult | None = None
        self.samples_dropped = 0  #: samples of windows that no micro-batch could hold
        self._source: tuple[Iterable[Any] | WindowSource, WindowSource] | None = None
        self._warned_small = False

    # what a window needs lives on its trainer, once; these are views of it
    module = Delegated[nn.Module]("trainer")
    model = Delegated[nn.Module]("trainer")
    optimizer = Delegated[torch.optim.Optimizer]("trainer")
    scheduler = Delegated[Any]("trainer")
    scaler = Delegated[torch.amp.GradScaler]("trainer")
    loss_fn = Delegated[LossFn]("trainer")
    count_fn = Delegated[CountFn]("trainer")
    device = Delegated[torch.device]("trainer")
    precision = Delegated[str]("trainer")
    max_grad_norm = Delegated["float | None"]("trainer")
    sync = Delegated[str]("trainer")
    resizer = Delegated[Resizer]("trainer")  #: the micro-batch's changes (train_window)
    steps = Delegated[int]("trainer")  #: optimizer steps taken or attempted
    plan = Delegated["Plan | None"]("planner")  #: the plan in force

    @property
    def forward_model(self) -> nn.Module:
        return self.trainer.forward_model

    # ------------------------------------------------------------------ planning

    @property
    def min_micro(self) -> int:
        return min_micro(self.module)

    @property
    def target_batch(self) -> int:
        """The target of the next optimizer step (the schedule's, where one was given)."""
        return self.schedule(self.steps)

    @property
    def share(self) -> int:
        return self.planner.share

    def replan(self, max_micro: int) -> Plan:
        """Plan with micro-batches of at most ``max_micro`` samples on this rank (no probe);
        every rank calls it, each with its own ceiling if it likes (they learn each other's
        split, :attr:`Plan.rank_sizes <autoaccum.plan.Plan.rank_sizes>`)."""
        check_count("max_micro", max_micro)
        return self.planner.replan(max_micro, self.steps, self.ranks)

    def probe(self, batch: Any, probed_on: str = "", *, upper: int | None = None) -> Plan:
        """Probe the largest micro-batch that trains, on the real samples of ``batch`` (what
        they are, in ``probed_on``), and plan with it (or with the fastest plan's micro-batch
        under it, per ``choose``); no larger than ``upper`` (default: this rank's share of a
        window). Every rank calls it. Where a micro-step runs no collective (one rank, or DDP
        with deferred sync) each rank probes its own device alone and plans under its own
        ceiling; otherwise (FSDP2, overlapped sync) the ranks agree on every trial and share
        the smallest ceiling. The model's state and the random streams are left as they were."""
        per_rank = self.share
        if upper is not None:
            per_rank = min(per_rank, check_count("upper", upper))
        alone = self.sync == "deferred"
        with preserved_rng():
            found = self.ranks.run(
                lambda: probe(
                    self.forward_model if alone else self.model,
                    batch,
                    loss_fn=self.loss_fn,
                    optimizer=self.optimizer,
                    upper=per_rank,
                    precision=self.precision,
                    margin=self.margin,
                    device=self.device,
                    ranks=None if alone else self.ranks,
                    choose=self.choose,
                ),
                "probing the micro-batch",
            )
        self.probe_result = dataclasses.replace(found, probed_on=probed_on)
        self.resizer.learn(self.probe_result)
        return self.replan(found.chosen if found.chosen is not None else found.max_micro)

    def probe_data(self, data: Iterable[Any] | WindowSource) -> Plan:
        """Probe on the heaviest samples of ``data`` where it can be scanned (a DataLoader
        over a map-style dataset; weighed by ``size_fn``), else on its first window."""
        share = self.share
        source = self.source(data)
        known = source.samples_per_epoch()
        if known:  # no micro-batch can hold more than a rank's whole epoch
            share = min(share, known)
        if isinstance(source, TokenWindows):  # as many of the longest as a rank's tokens
            share = min(token_upper(source, self.share), known or self.share)
        batch, what = self.ranks.run(
            lambda: source.probe_batch(share, self.size_fn), "reading the probe's samples"
        )
        return self.probe(batch, what, upper=share)

    # ------------------------------------------------------------------ data

    def source(self, data: Iterable[Any] | WindowSource) -> WindowSource:
        """The window source of ``data`` (a source is taken as it is; other data's is kept, so
        that the epochs of your own loop share workers and orders)."""
        if self._source is None or self._source[0] is not data:
            counted = self.count_fn if self.tokens else None
            self._source = (data, as_source(data, self.ranks, tokens=counted))
            if isinstance(self._source[1], TokenWindows):  # the count first: labels shifted?
                self.trainer.prepare_count(self._source[1].sample_batch(2))
                self.planner.longest = self._source[1].longest()
        return self._source[1]

    def windows(
        self, data: Iterable[Any] | WindowSource, epoch: int = 0, *, skip: int = 0
    ) -> Iterator[TrainWindow]:
        """The windows of ``data`` for ``epoch`` (from window ``skip``): ``target_batch``
        samples each over all ranks (the last one of an epoch may be short). Without a plan
        yet, the data is probed first. With rank-local data the ranks agree before each window
        that all of them have one; the epoch ends for all when the first runs out."""
        source = self.source(data)
        if self.plan is None:
            self.probe_data(source)
        assert self.plan is not None  # set by probe()
        if not self._warned_small:
            self._warned_small = True
            warn_larger_than_data(source, self.plan, self.dist.world_size)
        first = self.steps - skip  # window k of this epoch is optimizer step first + k
        for window in epoch_windows(
            source,
            lambda k: self.planner.plan_for(self.schedule(first + k)),
            epoch,
            ranks=self.ranks,
            skip=skip,
            dropped=self._dropped,
        ):
            yield TrainWindow(self.trainer, window)

    def epoch_windows(self, source: WindowSource, first: int) -> int | None:
        """How many windows an epoch of ``source`` holds when its first is optimizer step
        ``first`` (a schedule's targets differ along the run); None when not knowable."""
        return source.num_windows(lambda k: self.planner.plan_for(self.schedule(first + k)))

    def _dropped(self, window: Window) -> None:
        self.samples_dropped += warn_dropped(window)

    # ------------------------------------------------------------------ the window

    def backward(self, micro: Micro) -> torch.Tensor:
        """Forward and backward of one micro-batch of the open window, weighted by its share of
        the window's items; returns its mean loss, detached."""
        return self.trainer.backward(micro)

    def step(self) -> StepOutcome:
        """Apply the open window (see :meth:`WindowTrainer.step
        <autoaccum.train.window.WindowTrainer.step>`): the loss, samples and items it trained
        on, and whether the optimizer stepped (an fp16 step the GradScaler skips does not)."""
        return self.trainer.step()

    def train_window(self, window: TrainWindow) -> StepOutcome:
        """All of ``window``'s micro-steps and its optimizer step, surviving out-of-memory
        errors (the window re-run smaller on every rank; the smaller plan kept, grown back
        after a run of clean windows); ``fit`` runs this."""
        plan = self.planner.for_window(window.data)
        outcome, after = self.trainer.train(window, plan)
        self.planner.trained(after)
        return outcome

    # ------------------------------------------------------------------ state

    def state_dict(self, *, writer: bool = True) -> dict[str, Any] | None:
        """What a checkpoint keeps of the loop (:func:`~autoaccum.train.loop_state.take`);
        every rank must call it, a rank that is not ``writer`` gets None."""
        world = self.dist.world_size
        plan, probe = self.plan, self.probe_result
        return loop_state.take(self.trainer, plan, probe, self.target_batch, world, writer=writer)

    def load_state_dict(self, saved: Saved, *, any_world: bool = False) -> bool:
        """Put a checkpoint's state back, all of it checked first (a ConfigError, and nothing
        loaded, on a mismatch; another world size only with ``any_world``); True when the plan
        came back with it (:func:`~autoaccum.train.loop_state.put`)."""
        world, rank = self.dist.world_size, self.dist.rank
        target = self.schedule(saved.position.steps)  # the target where it stopped
        restored = loop_state.put(self.trainer, saved, target, world, rank, any_world=any_world)
        if restored is not None:
            self.plan, self.probe_result = restored
        return restored is not None

    def close(self) -> None:
        """Release the ranks' exchange group (``fit`` calls this; so should your own loop)."""
        self.ranks.close()
