"""A user's DataLoader re-batched into equal micro-batches, for loops that need them (Lightning's).

Such a loop takes one micro-batch size and divides each micro-batch's loss by the number of
micro-batches per optimizer step, so a step is exact only over a whole window of full
micro-batches. :func:`rebatched` keeps the dataset, sampler, ``collate_fn`` and worker
settings and changes the batch size; for a stream (an ``IterableDataset``, whose length is
unknown until it ends) with ``drop_last`` it returns a :class:`WholeWindows` loader, which
hands on whole windows only and counts what it leaves out.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from autoaccum.errors import ConfigError
from autoaccum.plan import Plan
from autoaccum.step.batches import batch_size
from autoaccum.step.rng import preserved_rng
from autoaccum.train.data.loader import LOADER_SETTINGS

__all__ = ["WholeWindows", "epoch_end", "first_samples", "rebatched"]


def first_samples(loader: DataLoader[Any], count: int) -> Any:
    """The first ``count`` samples of the loader's order, collated by its ``collate_fn``, with
    no random stream moved (a sampler's own generator included); of a stream, its first batch
    (the probe tiles it)."""
    with preserved_rng():
        if isinstance(loader.dataset, IterableDataset):
            return next(iter(loader))
        generator = getattr(loader.sampler, "generator", None)
        own = generator if isinstance(generator, torch.Generator) else None
        saved = own.get_state() if own is not None else None
        try:
            indices = list(itertools.islice(iter(loader.sampler), count))
        finally:
            if own is not None and saved is not None:
                own.set_state(saved)
    return loader.collate_fn([loader.dataset[i] for i in indices])


def rebatched(loader: DataLoader[Any], plan: Plan, drop_last: bool) -> DataLoader[Any]:
    """A DataLoader over the same dataset (and sampler) with ``plan.micro_batch`` samples per
    batch; for a stream with ``drop_last``, one that yields whole windows only."""
    accepted = inspect.signature(DataLoader.__init__).parameters
    names = (*LOADER_SETTINGS, "generator")
    kwargs = {k: getattr(loader, k) for k in names if k in accepted and hasattr(loader, k)}
    if not isinstance(loader.dataset, IterableDataset):
        kwargs["sampler"] = loader.sampler
    elif drop_last:
        return WholeWindows(loader.dataset, plan, batch_size=plan.micro_batch, **kwargs)
    return DataLoader(loader.dataset, batch_size=plan.micro_batch, drop_last=drop_last, **kwargs)


class WholeWindows(DataLoader[Any]):
    """A stream's batches, whole windows only: ``plan.accum_iter`` batches of
    ``plan.micro_batch`` samples each. A short batch (a worker's last) and the short window
    at the end are left out; ``dropped`` holds the samples left out by the last pass.

    One window of batches is held back until it is whole."""

    def __init__(self, dataset: IterableDataset[Any], plan: Plan, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.plan = plan
        self.dropped = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        self.dropped = 0
        window: list[Any] = []
        for batch in super().__iter__():
            size = batch_size(batch)
            if size != self.plan.micro_batch:
                self.dropped += size
                continue
            window.append(batch)
            if len(window) == self.plan.accum_iter:
                yield from window
                window = []
        self.dropped += len(window) * self.plan.micro_batch

    def __len__(self) -> int:
        """At most this many batches (exact when the dataset's length is and no worker
        leaves a short batch)."""
        full = len(self.dataset) // self.plan.micro_batch  # type: ignore[arg-type]
        return full // self.plan.accum_iter * self.plan.accum_iter


def epoch_end(
    loader: DataLoader[Any], plan: Plan, limit: int | float, drop_last: bool
) -> tuple[int | None, int | None, int | float]:
    """How an epoch of the re-batched ``loader`` ends, under the loop's batch ``limit`` (an
    int: batches; a float: a share of the epoch): (samples per device in the short last
    window, samples per device left out by ``drop_last``, the limit to train with, which
    ``drop_last`` lowers to whole windows). A stream's figures are known only at its end
    (None)."""
    if isinstance(loader.dataset, IterableDataset):
        whole = limit - limit % plan.accum_iter if isinstance(limit, int) else limit
        if drop_last and whole == 0:
            raise ConfigError(
                f"limit_train_batches={limit} is less than one window of {plan.accum_iter} "
                "micro-batches; drop_last=True would leave nothing to train"
            )
        return None, None, whole if drop_last else limit
    samples = len(loader.sampler)  # type: ignore[arg-type]
    length = -(-samples // plan.micro_batch)  # batches without drop_last
    batches = min(length, limit) if isinstance(limit, int) else int(length * (limit or 0))
    trained = min(samples, batches * plan.micro_batch)
    if not drop_last:
        return trained % plan.per_rank, 0, limit
    whole = trained // plan.per_rank * plan.accum_iter
    if whole == 0:
        raise ConfigError(
            f"an epoch holds {trained} samples per device, less than one window of "
            f"{plan.per_rank}; drop_last=True would leave nothing to train"
        )
    return 0, trained - whole * plan.micro_batch, whole if whole < len(loader) else limit
