"""PyTorch Lightning: probe with the model's own ``training_step``, then batch exactly.

:class:`AutoAccum` is a Callback. At ``on_fit_start`` (model on its device, DDP-wrapped,
optimizer built) it takes the train DataLoader the fit loop is about to use (as Lightning's
own batch-size finder does; under DDP it holds the DistributedSampler), probes on real
samples of the first window (ranks agree on every trial), picks the largest divisor of the
per-device share under the ceiling (Lightning needs equal micro-batches), hands the fit loop
the same loader re-batched, as if passed to ``trainer.fit``, and sets
``trainer.accumulate_grad_batches``. The plan line goes to Lightning's rank-zero log (shown
without any logging set-up, once), the plan to the Trainer's loggers (``log_hyperparams``).

Lightning divides each micro-batch's loss by ``accumulate_grad_batches``: exact for a
sample-mean loss over whole windows of full micro-batches; a short window (the last of an
epoch) is weighted as if it were whole (Lightning #19987), and token-level losses are
averaged per micro-batch. ``drop_last`` trains whole windows only: a map-style epoch is cut
to whole windows before it starts, a stream (``IterableDataset``) loses its short windows as
they pass. Without it a short window is warned about when accumulation makes it inexact: a
map-style one before training, a stream's at the end of the epoch that held it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from autoaccum import distributed as D
from autoaccum.errors import BatchError, ConfigError, MissingExtraError, check_count
from autoaccum.memory.peaks import DEFAULT_MARGIN, check_margin
from autoaccum.plan import Plan, check_target, compare_with_fit, equal_plan
from autoaccum.probing.trials import probe
from autoaccum.results import ProbeResult
from autoaccum.step.batches import batch_size
from autoaccum.step.model import min_micro
from autoaccum.step.ranks import Ranks
from autoaccum.step.rng import preserved_rng
from autoaccum.train.data.equal import WholeWindows, epoch_end, first_samples, rebatched

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import GradientAccumulationScheduler
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
    from lightning.pytorch.utilities.rank_zero import rank_zero_info
except ImportError as exc:
    raise MissingExtraError("lightning", "lightning", "autoaccum.lightning") from exc

__all__ = ["AutoAccum", "Batching", "equal_plan"]


@dataclass(frozen=True)
class Batching:
    """What :class:`AutoAccum` chose for one ``trainer.fit`` (of a stream: as last seen)."""

    plan: Plan  #: equal micro-batches: micro_batch × accum_iter × world_size == target_batch
    probe: ProbeResult | None  #: None when ``max_micro`` was given
    #: samples per device in an epoch's short last window (0: whole; None: a stream not
    #: yet at its end)
    last_window: int | None
    #: samples per device per epoch left out by ``drop_last`` (None: a stream not yet at
    #: its end)
    dropped: int | None = 0

    def describe(self) -> str:
        p = self.plan
        return (
            f"target_batch {p.target_batch} = {p.micro_batch} × {p.accum_iter} "
            f"(accumulate_grad_batches) × {p.world_size} device(s); "
            f"{compare_with_fit(p, 'Lightning')}"
        )

    def hparams(self) -> dict[str, int]:
        """The plan and the probe's ceiling, flat, as the Trainer's loggers take them."""
        p = self.plan
        values = {
            "target_batch": p.target_batch,
            "micro_batch": p.micro_batch,
            "accum_iter": p.accum_iter,
            "world_size": p.world_size,
            "max_micro": p.max_micro,
        }
        if self.probe is not None:
            values["largest_pass"] = self.probe.largest_pass
        return {f"autoaccum/{k}": v for k, v in values.items()}


class AutoAccum(pl.Callback):  # type: ignore[misc]
    """Probe the micro-batch with the model's ``training_step`` and batch to ``target_batch``.

    ``target_batch`` is global: samples per optimizer step over all devices.
    ``max_micro`` skips the probe. ``drop_last=True`` trains whole windows only, so every
    optimizer step is exact for a sample-mean loss (the samples left out are logged; a
    stream's as it ends). ``batching`` holds the decision after ``on_fit_start``.
    """

    def __init__(
        self,
        target_batch: int,
        *,
        max_micro: int | None = None,
        drop_last: bool = False,
        margin: float = DEFAULT_MARGIN,
    ) -> None:
        self.target_batch = check_count("target_batch", target_batch)
        self.max_micro = None if max_micro is None else check_count("max_micro", max_micro)
        self.drop_last = bool(drop_last)
        self.margin = check_margin(margin)
        self.batching: Batching | None = None
        self._limit: int | float | None = None  #: the Trainer's own limit_train_batches
        self._stream: DataLoader[Any] | None = None  #: the re-batched loader of a stream
        self._windows: list[list[int]] = []  #: a stream's windows this epoch: micro-batch sizes
        self._said: set[str] = set()  #: what was said once per fit

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Refuse what cannot work, before any data is read."""
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise ConfigError(
                "AutoAccum sets accumulate_grad_batches, which Lightning applies only with "
                "automatic optimization; under manual optimization accumulate yourself"
            )
        callbacks = getattr(trainer, "callbacks", [])  # set by Lightning at run time, untyped
        if any(isinstance(c, GradientAccumulationScheduler) for c in callbacks):
            raise ConfigError(
                "AutoAccum and GradientAccumulationScheduler both set accumulate_grad_batches; "
                "remove one of them"
            )
        strategy = trainer.strategy
        ok = isinstance(strategy, SingleDeviceStrategy) or (
            isinstance(strategy, DDPStrategy) and not isinstance(strategy, DeepSpeedStrategy)
        )
        if not ok and self.max_micro is None:
            raise ConfigError(
                f"AutoAccum probes on one device or under DDP, not under "
                f"{type(strategy).__name__}; pass AutoAccum(..., max_micro=N) to skip the probe"
            )
        check_target(self.target_batch, trainer.world_size, equal=True)  # divisible?

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loop = trainer.fit_loop
        # the train loader as Lightning would train with it; the second setup below draws its
        # iterator's seed again and says what Lightning has to say about the loader trained
        with preserved_rng(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loop.setup_data()
        combined = loop._combined_loader
        if combined is None:  # limit_train_batches=0 or no training_step: nothing trains
            return
        loaders = combined.flattened
        if len(loaders) != 1 or not isinstance(loaders[0], DataLoader):
            raise ConfigError(
                f"AutoAccum re-batches one train DataLoader; this run has {len(loaders)} train "
                f"iterables ({', '.join(type(x).__name__ for x in loaders)})"
            )
        loader: DataLoader[Any] = loaders[0]
        if loader.batch_size is None:
            raise ConfigError(
                "the train DataLoader has no batch_size (a custom batch_sampler, or batch_size="
                "None), so AutoAccum cannot change it; pass a DataLoader with batch_size and a "
                "sampler"
            )
        world = trainer.world_size
        share = self.target_batch // world
        found = None
        ceiling = self.max_micro
        if ceiling is None:
            found = _probe(trainer, pl_module, first_samples(loader, share), share, self.margin)
            ceiling = found.max_micro  # the smallest of every rank's
        plan = equal_plan(self.target_batch, ceiling, world, min_micro(pl_module))
        new = rebatched(loader, plan, self.drop_last)
        last, dropped, limit = epoch_end(new, plan, trainer.limit_train_batches, self.drop_last)
        # nothing is changed above this line
        self._limit, trainer.limit_train_batches = trainer.limit_train_batches, limit
        trainer.accumulate_grad_batches = plan.accum_iter
        combined.flattened = [new]
        loop._data_source.instance = combined  # as if passed to trainer.fit(train_dataloaders=)
        loop._combined_loader = None  # make the loop set it up again (as Lightning's finder does)
        loop.setup_data()
        self.batching = Batching(plan=plan, probe=found, last_window=last, dropped=dropped)
        self._stream = new if isinstance(new.dataset, IterableDataset) else None
        self._said = set()
        if trainer.is_global_zero:
            _report(self.batching, trainer)

    # a stream's windows are known only as they pass: each batch's samples are noted

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._windows = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._stream is None or self.batching is None:
            return
        try:
            size = batch_size(batch)
        except BatchError as err:  # trainable, but not countable: the check is off
            self._stream = None
            warnings.warn(f"AutoAccum cannot check the stream's windows: {err}", stacklevel=2)
            return
        if not self._windows or len(self._windows[-1]) == self.batching.plan.accum_iter:
            self._windows.append([])
        self._windows[-1].append(size)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._stream is None or self.batching is None:
            return
        p = self.batching.plan
        short = [w for w in self._windows if sum(w) != p.per_rank]
        last = sum(self._windows[-1]) if self._windows and short[-1:] == self._windows[-1:] else 0
        dropped = self._stream.dropped if isinstance(self._stream, WholeWindows) else 0
        self.batching = replace(self.batching, last_window=last, dropped=dropped)
        if dropped and not self._windows:
            raise ConfigError(
                f"the stream held {dropped} samples on this device in epoch "
                f"{trainer.current_epoch}, less than one window of {p.per_rank}; drop_last=True "
                "left nothing to train"
            )
        if not trainer.is_global_zero:
            return
        if short and p.accum_iter > 1 and "short" not in self._said:
            self._said.add("short")
            advice = (
                "limit_train_batches ended the epoch inside a window"
                if self.drop_last
                else "Pass AutoAccum(..., drop_last=True) to train whole windows only"
            )
            which = f"a window of epoch {trainer.current_epoch}"
            _warn_short(which, sum(short[-1]), len(short[-1]), p, advice)
        if dropped and "dropped" not in self._said:
            self._said.add("dropped")
            rank_zero_info(
                f"AutoAccum: drop_last left out {dropped} samples of the stream on this device "
                f"in epoch {trainer.current_epoch} (short batches and the short last window)"
            )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Give the Trainer back its own ``limit_train_batches`` (``drop_last`` lowers it)."""
        if stage == "fit" and self._limit is not None:
            trainer.limit_train_batches = self._limit
            self._limit = None


def _report(batching: Batching, trainer: pl.Trainer) -> None:
    """The plan line (Lightning's rank-zero log: shown by default) and the loggers' copy."""
    rank_zero_info(f"AutoAccum: {batching.describe()}")
    for logger in trainer.loggers:
        logger.log_hyperparams(batching.hparams())
    p = batching.plan
    if batching.dropped:
        rank_zero_info(f"AutoAccum: drop_last leaves out {batching.dropped} samples/device/epoch")
    if batching.last_window and p.accum_iter > 1:  # one micro-batch per window: exact
        micro = -(-batching.last_window // p.micro_batch)
        advice = "Pass AutoAccum(..., drop_last=True) to train whole windows only"
        _warn_short("the last window of every epoch", batching.last_window, micro, p, advice)
    if getattr(trainer, "reload_dataloaders_every_n_epochs", 0):
        warnings.warn(
            "AutoAccum: with reload_dataloaders_every_n_epochs the re-batched loader is reused; "
            "your train_dataloader() hook is not called again",
            stacklevel=2,
        )


def _warn_short(which: str, samples: int, micro: int, plan: Plan, advice: str) -> None:
    count = f"{micro} micro-batch{'es' if micro > 1 else ''}"
    warnings.warn(
        f"AutoAccum: {which} holds {samples} samples per device in {count} instead of "
        f"{plan.per_rank} in {plan.accum_iter} of {plan.micro_batch}; Lightning divides each "
        f"micro-batch's loss by accumulate_grad_batches={plan.accum_iter}, so that step is "
        f"weighted as if the window were whole (Lightning #19987). {advice}",
        stacklevel=3,
    )


def _probe(
    trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, share: int, margin: float
) -> ProbeResult:
    """Probe on the unwrapped module: a trial then runs no collective (no DDP buffer broadcast
    or gradient hooks) that a rank out of memory would leave the others waiting in."""
    precision = trainer.precision_plugin

    def loss_fn(model: torch.nn.Module, micro: Any) -> torch.Tensor:
        micro = precision.convert_input(micro)
        micro = pl_module._on_before_batch_transfer(micro, dataloader_idx=0)
        micro = trainer.strategy.batch_to_device(micro, dataloader_idx=0)
        with precision.train_step_context():
            out = pl_module.training_step(micro, 0)
        loss = out.get("loss") if isinstance(out, Mapping) else out
        if not isinstance(loss, torch.Tensor):
            raise ConfigError(
                f"training_step returned {type(out).__name__} for the probe batch; AutoAccum "
                "needs the loss (a tensor, or a dict with 'loss')"
            )
        return loss

    ranks = Ranks(D.current())  # every rank probes: they agree on each trial and the ceiling
    # self.log / self.log_dict as no-ops: the trials are not training
    pl_module.__dict__["log"] = pl_module.__dict__["log_dict"] = _skip
    try:
        found = probe(
            pl_module,
            batch,
            loss_fn=loss_fn,
            optimizer=trainer.optimizers[0],
            upper=share,
            precision="fp32",  # Lightning's precision plugin autocasts inside loss_fn
            margin=margin,
            device=trainer.strategy.root_device,
            ranks=ranks,
            choose="largest",  # Lightning needs equal micro-batches: the ceiling's divisor
        )
    finally:
        del pl_module.__dict__["log"], pl_module.__dict__["log_dict"]
        ranks.close()
    return replace(found, probed_on=f"the first samples of the train loader (per device {share})")


def _skip(*args: Any, **kwargs: Any) -> None:
    return None
