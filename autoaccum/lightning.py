"""PyTorch Lightning: probe with the model's own ``training_step``, then batch exactly.

:class:`AutoAccum` is a Callback. At ``on_fit_start`` (model on its device, DDP-wrapped,
optimizer built) it takes the train DataLoader the fit loop is about to use (as Lightning's
own batch-size finder does; under DDP it holds the DistributedSampler), probes on real
samples of the first window (ranks agree on every trial), picks the largest divisor of the
per-device share under the ceiling (Lightning needs equal micro-batches), hands the fit loop
the same loader re-batched, as if passed to ``trainer.fit``, and sets
``trainer.accumulate_grad_batches``.

Lightning divides each micro-batch's loss by ``accumulate_grad_batches``: exact for a
sample-mean loss over full windows of equal micro-batches; the short last window of an epoch
is under-weighted (Lightning #19987) and token-level losses are averaged per micro-batch.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from autoaccum import distributed as D
from autoaccum.errors import ConfigError, MissingExtraError, check_count
from autoaccum.plan import Plan, compare_with_fit, equal_plan, make_plan
from autoaccum.probing.peaks import DEFAULT_MARGIN, check_margin
from autoaccum.probing.state import preserved_rng
from autoaccum.probing.trials import probe
from autoaccum.results import ProbeResult
from autoaccum.train.data.loader import LOADER_SETTINGS
from autoaccum.train.model import min_micro

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import GradientAccumulationScheduler
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy
except ImportError as exc:
    raise MissingExtraError("lightning", "lightning", "autoaccum.lightning") from exc

__all__ = ["AutoAccum", "Batching", "equal_plan"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Batching:
    """What :class:`AutoAccum` chose for one ``trainer.fit``."""

    plan: Plan  #: equal micro-batches: micro_batch × accum_iter × world_size == target_batch
    probe: ProbeResult | None  #: None when ``max_micro`` was given
    last_window: int | None  #: samples per device in an epoch's short last window (None: unknown)
    dropped: int = 0  #: samples per device per epoch left out by ``drop_last``

    def describe(self) -> str:
        p = self.plan
        return (
            f"target_batch {p.target_batch} = {p.micro_batch} × {p.accum_iter} "
            f"(accumulate_grad_batches) × {p.world_size} device(s); "
            f"{compare_with_fit(p, 'Lightning')}"
        )


class AutoAccum(pl.Callback):  # type: ignore[misc]
    """Probe the micro-batch with the model's ``training_step`` and batch to ``target_batch``.

    ``target_batch`` is global: samples per optimizer step over all devices.
    ``max_micro`` skips the probe. ``drop_last=True`` trains whole windows only, so every
    optimizer step is exact for a sample-mean loss (the samples left out are logged).
    ``batching`` holds the decision after ``on_fit_start``.
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
        make_plan(self.target_batch, self.target_batch, trainer.world_size)  # divisible?

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loop = trainer.fit_loop
        loop.setup_data()  # the train loader as Lightning will train with it
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
            found = _probe(trainer, pl_module, _first_samples(loader, share), share, self.margin)
            ceiling = int(D.all_reduce_min(float(found.max_micro), D.current()))
        plan = equal_plan(self.target_batch, ceiling, world, min_micro(pl_module))
        trainer.accumulate_grad_batches = plan.accum_iter
        new = _rebatched(loader, plan.micro_batch, self.drop_last)
        self._limit = trainer.limit_train_batches
        last, dropped = _epoch_end(trainer, new, plan, self.drop_last)
        combined.flattened = [new]
        loop._data_source.instance = combined  # as if passed to trainer.fit(train_dataloaders=)
        loop._combined_loader = None  # make the loop set it up again (as Lightning's finder does)
        loop.setup_data()
        self.batching = Batching(plan=plan, probe=found, last_window=last, dropped=dropped)
        if trainer.is_global_zero:
            _report(self.batching, trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Give the Trainer back its own ``limit_train_batches`` (``drop_last`` lowers it)."""
        if stage == "fit" and self._limit is not None:
            trainer.limit_train_batches = self._limit
            self._limit = None


def _report(batching: Batching, trainer: pl.Trainer) -> None:
    log.info("AutoAccum: %s", batching.describe())
    p = batching.plan
    if batching.dropped:
        log.info("AutoAccum: drop_last leaves out %d samples/device/epoch", batching.dropped)
    if batching.last_window:
        k = -(-batching.last_window // p.micro_batch)
        warnings.warn(
            f"AutoAccum: the last window of every epoch holds {batching.last_window} samples "
            f"per device ({k} of {p.accum_iter} micro-batches) instead of {p.per_rank}; "
            f"Lightning divides each micro-batch's loss by accumulate_grad_batches="
            f"{p.accum_iter}, so that step is weighted as if the window were full "
            "(Lightning #19987). Pass AutoAccum(..., drop_last=True) to train whole windows only",
            stacklevel=2,
        )
    if getattr(trainer, "reload_dataloaders_every_n_epochs", 0):
        warnings.warn(
            "AutoAccum: with reload_dataloaders_every_n_epochs the re-batched loader is reused; "
            "your train_dataloader() hook is not called again",
            stacklevel=2,
        )


def _first_samples(loader: DataLoader[Any], count: int) -> Any:
    """The first ``count`` samples of the loader's order, collated by its ``collate_fn``; no
    random stream moves (a sampler's own generator included)."""
    with preserved_rng():
        if isinstance(loader.dataset, IterableDataset):
            return next(iter(loader))  # one batch; the probe tiles it
        generator = getattr(loader.sampler, "generator", None)
        own = generator if isinstance(generator, torch.Generator) else None
        saved = own.get_state() if own is not None else None
        try:
            indices = list(itertools.islice(iter(loader.sampler), count))
        finally:
            if own is not None and saved is not None:
                own.set_state(saved)
    return loader.collate_fn([loader.dataset[i] for i in indices])


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

    info = D.current()

    def agree(failed: bool) -> bool:
        return D.all_reduce_max(float(failed), info) > 0

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
            agree=agree if info.active and info.world_size > 1 else None,
        )
    finally:
        del pl_module.__dict__["log"], pl_module.__dict__["log_dict"]
    return replace(found, probed_on=f"the first samples of the train loader (per device {share})")


def _skip(*args: Any, **kwargs: Any) -> None:
    return None


def _rebatched(loader: DataLoader[Any], micro: int, drop_last: bool) -> DataLoader[Any]:
    """A DataLoader over the same dataset and sampler with ``micro`` samples per batch."""
    accepted = inspect.signature(DataLoader.__init__).parameters
    names = (*LOADER_SETTINGS, "generator")
    kwargs = {k: getattr(loader, k) for k in names if k in accepted and hasattr(loader, k)}
    if not isinstance(loader.dataset, IterableDataset):
        kwargs["sampler"] = loader.sampler
    return DataLoader(loader.dataset, batch_size=micro, drop_last=drop_last, **kwargs)


def _epoch_end(
    trainer: pl.Trainer, loader: DataLoader[Any], plan: Plan, drop_last: bool
) -> tuple[int | None, int]:
    """(samples per device in the short last window, samples per device dropped); with
    ``drop_last`` the epoch is cut to whole windows through ``limit_train_batches``."""
    if isinstance(loader.dataset, IterableDataset):
        return None, 0
    samples = len(loader.sampler)  # type: ignore[arg-type]
    length = -(-samples // plan.micro_batch)  # batches without drop_last
    limit = trainer.limit_train_batches
    batches = min(length, limit) if isinstance(limit, int) else int(length * (limit or 0))
    trained = min(samples, batches * plan.micro_batch)
    if not drop_last:
        return trained % plan.per_rank, 0
    whole = trained // plan.per_rank * plan.accum_iter
    if whole == 0:
        raise ConfigError(
            f"an epoch holds {trained} samples per device, less than one window of "
            f"{plan.per_rank}; drop_last=True would leave nothing to train"
        )
    if whole < len(loader):
        trainer.limit_train_batches = whole
    return 0, trained - whole * plan.micro_batch
