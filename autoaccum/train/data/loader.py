"""Re-batching a DataLoader over a map-style dataset into windows of micro-batches.

autoaccum keeps the user's dataset, sampler order, ``collate_fn`` and worker settings,
but cuts the index order into micro index lists itself, so that every micro-batch is
collated on its own (a padding ``collate_fn`` pads each micro-batch to its own longest
sample) and every window holds exactly ``plan.per_rank`` samples. The loader's
``batch_size`` does not matter; with ``drop_last=True`` the short last window of an
epoch is dropped (and counted), otherwise it is trained, weighted by its own size.

The epoch's order is the one the user's loader draws in one process (its sampler, its
generator or torch's seed), whatever the number of ranks: global window k is samples
``k·target_batch .. (k+1)·target_batch - 1`` of it, and each rank reads its share of every
window (:func:`~autoaccum.plan.shares`: as equal as the counts allow, no sample repeated),
so the run is the same on 1, 2 or 3 ranks and every sample counts once per epoch. The ranks
train on rank 0's draw (``share_order``), so a rank seeded otherwise cannot part from it. A
user's own DistributedSampler is kept as it is: each rank then reads its sampler's share
(world-size dependent, padded as DistributedSampler pads). A custom batch_sampler (e.g.
bucketing) keeps only its order of indices: its grouping is replaced by autoaccum's
windows.

The random state advances exactly as the user's own loader would advance it: each
epoch draws the workers' base seed and the sampler's permutation once, from the same
generator, at the start of the epoch (the probe batch is collated from epoch 0's order
without moving any random stream).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler
from torch.utils.data._utils.collate import default_collate, default_convert

from autoaccum.errors import BatchError, ConfigError, check_count
from autoaccum.plan import Plan, Plans, plans_of, shares
from autoaccum.step.rng import preserved_rng
from autoaccum.train.data.cut import Window, too_small
from autoaccum.train.data.heaviest import SizeFn, heaviest
from autoaccum.train.data.order import DrawState, check_rank_sampler, fork_base_seed

__all__ = ["LOADER_SETTINGS", "LoaderWindows"]

# DataLoader settings carried over to the re-batching loader, when this torch has them.
LOADER_SETTINGS = (
    "num_workers",
    "collate_fn",
    "pin_memory",
    "timeout",
    "worker_init_fn",
    "multiprocessing_context",
    "prefetch_factor",
    "persistent_workers",
    "pin_memory_device",
    "in_order",
)


class _MicroIndexLists:
    """A batch sampler whose index lists are replaced every epoch.

    One re-batching DataLoader then serves every epoch, so persistent workers
    really persist instead of a new pool being started (and leaked) per epoch.
    """

    def __init__(self) -> None:
        self.lists: list[list[Any]] = []

    def __iter__(self) -> Iterator[list[Any]]:
        return iter(self.lists)

    def __len__(self) -> int:
        return len(self.lists)


class LoaderWindows:
    """The windows of a DataLoader over a map-style dataset, re-batched, for one rank."""

    #: every rank reads its share of one dataset: windows line up across ranks
    rank_local = False

    def __init__(
        self,
        loader: DataLoader[Any],
        *,
        rank: int = 0,
        world_size: int = 1,
        share_order: Callable[[list[Any]], list[Any]] | None = None,
    ) -> None:
        self.loader = loader
        self.rank = rank
        self.world_size = world_size
        #: every rank's epoch order made rank 0's (None: this rank's draw is taken as it is)
        self.share_order = share_order
        #: True when every rank reads shares of the one global order (False: the user's
        #: DistributedSampler gives each rank its own share)
        self.global_order = True
        self._sampler: Iterable[Any] | None = None
        self._batch_sampler: Iterable[Sequence[Any]] | None = None
        self._collate_fn: Any = loader.collate_fn
        self._micro_lists = _MicroIndexLists()
        self._inner: DataLoader[Any] | None = None
        #: an epoch's order drawn ahead of its windows (by sample_batch), with its seed replay
        self._drawn: tuple[int, list[Any], torch.Generator | None] | None = None
        #: the random state each epoch's order was drawn from (for an exact resume)
        self._drawn_from: dict[int, DrawState] = {}
        self._setup()

    # ------------------------------------------------------------------ set-up

    def _setup(self) -> None:
        loader = self.loader
        user_batch_sampler = loader.batch_sampler
        if user_batch_sampler is None or type(user_batch_sampler) is BatchSampler:
            # A plain BatchSampler only groups its sampler's order; take that order.
            sampler = loader.sampler if user_batch_sampler is None else user_batch_sampler.sampler
            self._sampler = check_rank_sampler(sampler, rank=self.rank, world_size=self.world_size)
            self.global_order = not isinstance(sampler, DistributedSampler)
        else:
            # Its grouping (e.g. bucketing) is replaced by autoaccum's windows; only
            # the order of its indices is kept.
            self._batch_sampler = user_batch_sampler
        if loader.batch_sampler is None:  # batch_size=None: collate_fn sees single samples
            if loader.collate_fn is not default_convert:
                raise ConfigError(
                    "the DataLoader has batch_size=None with a custom collate_fn, which then "
                    "takes one sample at a time; autoaccum collates a list of samples per "
                    "micro-batch. Pass batch_size=1 (autoaccum picks the micro-batch sizes) "
                    "and a collate_fn that takes a list of samples"
                )
            self._collate_fn = default_collate

    # ------------------------------------------------------------------ sizes

    def samples_per_epoch(self) -> int | None:
        """Samples in an epoch's order: the whole dataset's, which the ranks share
        (:attr:`global_order`), or this rank's own with a DistributedSampler; None when not
        knowable up front (a custom batch_sampler, a sampler without a length)."""
        if self._batch_sampler is not None or not isinstance(self._sampler, Sized):
            return None
        return len(self._sampler)

    def dataset_size(self) -> int | None:
        """The dataset's length (every rank reads its share of it), None when unknown."""
        try:
            return len(self.loader.dataset)  # type: ignore[arg-type]
        except TypeError:
            return None

    def num_windows(self, plans: Plan | Plans) -> int | None:
        """Windows (optimizer steps) per epoch, or None when not knowable."""
        samples = self.samples_per_epoch()
        if samples is None:
            return None
        plan_of, start, count = plans_of(plans), 0, 0
        while start < samples:
            start += self._size(plan_of(count))
            count += 1
            if start > samples and self.loader.drop_last:
                count -= 1
        return count

    def _size(self, plan: Plan) -> int:
        """Samples of the order one window of ``plan`` takes (every rank's, or this rank's)."""
        return plan.target_batch if self.global_order else plan.per_rank

    # ------------------------------------------------------------------ order

    def _draw(self, epoch: int) -> tuple[list[Any], torch.Generator | None]:
        """This rank's index order for ``epoch`` and the generator for the workers' seed,
        drawn as the user's loader draws them when an epoch starts.

        The generator is None when the user's loader would draw no base seed this epoch
        (persistent workers are seeded once, at their first epoch).
        """
        if self._drawn is not None and self._drawn[0] == epoch:
            _, order, replay = self._drawn
            self._drawn = None
            return order, replay
        loader = self.loader
        self._drawn_from = {epoch: DrawState.capture(loader.generator)}
        persistent = loader.persistent_workers and loader.num_workers > 0
        replay = None
        if not (persistent and self._inner is not None):
            replay = fork_base_seed(loader.generator)
        source = self._batch_sampler if self._batch_sampler is not None else self._sampler
        set_epoch = getattr(source, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        if self._batch_sampler is not None:
            order = [index for group in self._batch_sampler for index in group]
        else:
            assert self._sampler is not None  # set by _setup whenever there is no batch_sampler
            order = list(self._sampler)
        if self.global_order and self.share_order is not None:
            order = self.share_order(order)  # rank 0's: every rank reads the same order
        return order, replay

    def epoch_state(self, epoch: int) -> DrawState | None:
        """The random state ``epoch``'s order was drawn from (None before it was drawn)."""
        return self._drawn_from.get(epoch)

    def restore_epoch(self, epoch: int, state: object) -> None:
        """Draw ``epoch``'s order again from the random state it was first drawn from (see
        :meth:`epoch_state`), for :meth:`windows` to use; the caller then puts back the random
        state of the moment it resumes from."""
        if not isinstance(state, DrawState):
            raise ConfigError(
                "the checkpoint's data position was saved for another kind of data (not a "
                "DataLoader over a map-style dataset); resume with the data it was taken with"
            )
        state.restore(self.loader.generator)
        self._drawn = (epoch, *self._draw(epoch))

    def probe_batch(self, size: int, size_fn: SizeFn | None = None) -> tuple[Any, str]:
        """The batch to probe with, and what it is: the ``size`` heaviest samples of the
        dataset collated together (see :mod:`~autoaccum.train.data.heaviest`), or, where the
        dataset cannot be read by index and counted, the first samples of epoch 0."""
        dataset = self.loader.dataset
        try:
            total = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            return self.sample_batch(size), f"the first {size} samples of epoch 0"
        if total == 0:
            raise self._empty_error()
        with preserved_rng():  # reading samples may draw random augmentations
            found = heaviest(dataset, range(total), min(size, total), size_fn=size_fn)
        return self.collate(found.indices), found.describe()

    def collate(self, indices: Sequence[Any]) -> Any:
        """One batch of ``indices``, fetched and collated as a worker would, on this process,
        without moving any random stream (a random augmentation draws nothing that training
        would otherwise have drawn)."""
        dataset = self.loader.dataset
        with preserved_rng():
            getitems = getattr(dataset, "__getitems__", None)
            samples = getitems(list(indices)) if getitems else [dataset[i] for i in indices]
            return self._collate_fn(samples)

    def sample_batch(self, size: int) -> Any:
        """One host batch of the first ``min(size, available)`` samples of epoch 0 on this rank.

        Epoch 0's order is drawn here, as the user's loader would draw it (the random
        state advances), and kept for :meth:`windows`; the samples are collated in one
        ``collate_fn`` call (so padding is realistic) without moving any random stream.
        """
        check_count("size", size)
        if self._drawn is None:
            self._drawn = (0, *self._draw(0))
        indices = self._drawn[1][:size]
        if not indices:
            raise self._empty_error()
        return self.collate(indices)

    # ------------------------------------------------------------------ windows

    def windows(self, plans: Plan | Plans, epoch: int, *, skip: int = 0) -> Iterator[Window]:
        """This rank's windows of ``epoch``, in order: window k holds ``plans(k)``'s target
        (its share of it on this rank), or ``plans.target_batch`` for one plan.

        The order is drawn when this is called (the start of the epoch). The first ``skip``
        windows are left out without fetching their samples (a resumed run).
        """
        order, replay = self._draw(epoch)
        if epoch == 0 and not order:
            raise self._empty_error()
        micro_lists: list[list[Any]] = []
        layout: list[tuple[int, tuple[int, ...], int, str, bool, int]] = []
        plan_of, start, index = plans_of(plans), 0, -1
        while start < len(order):
            index += 1
            plan = plan_of(index)
            size = self._size(plan)
            window, start = order[start : start + size], start + size
            anywhere = True  # some rank trains a sample of it
            if len(window) < size and self.loader.drop_last:
                sizes: tuple[int, ...] = ()
                why, anywhere = "the DataLoader has drop_last=True", False
            else:
                if self.global_order:  # this rank's share of the global window
                    counts = shares(len(window), self.world_size)
                    first = sum(counts[: self.rank])
                    window = window[first : first + counts[self.rank]]
                    anywhere = counts[0] >= plan.min_micro  # rank 0's share is the largest
                sizes = plan.window_sizes(len(window))
                why = too_small(plan.min_micro)
            if index < skip:
                continue
            layout.append(
                (index, sizes, len(window) - sum(sizes), why, anywhere, plan.target_batch)
            )
            offset = 0
            for size_ in sizes:
                micro_lists.append(window[offset : offset + size_])
                offset += size_
        return self._fetch(replay, micro_lists, layout, epoch)

    def _dataset(self) -> Any:
        """What the re-batching loader fetches the micro index lists' keys from."""
        return self.loader.dataset

    def _inner_loader(self, replay: torch.Generator | None) -> DataLoader[Any]:
        """The re-batching loader over the micro index lists (created once, reused)."""
        loader = self.loader
        if self._inner is None:
            accepted = inspect.signature(DataLoader.__init__).parameters
            settings = {
                name: getattr(loader, name)
                for name in LOADER_SETTINGS
                if name in accepted and hasattr(loader, name)
            }
            settings["collate_fn"] = self._collate_fn
            if not settings.get("pin_memory_device"):
                settings.pop("pin_memory_device", None)  # deprecated; pass only if set
            self._inner = DataLoader(
                self._dataset(), batch_sampler=self._micro_lists, generator=replay, **settings
            )
        elif replay is not None:
            self._inner.generator = replay
        return self._inner

    def _fetch(
        self,
        replay: torch.Generator | None,
        micro_lists: list[list[Any]],
        layout: list[tuple[int, tuple[int, ...], int, str, bool, int]],
        epoch: int,
    ) -> Iterator[Window]:
        inner = self._inner_loader(replay)
        self._micro_lists.lists = micro_lists  # replaced, never mutated: old epochs keep theirs
        batches = iter(inner)
        for index, sizes, dropped, why, anywhere, target in layout:
            micro_batches = tuple(next(batches) for _ in sizes)
            why = why if dropped else ""
            yield Window(epoch, index, micro_batches, sum(sizes), dropped, why, anywhere, target)

    def _empty_error(self) -> BatchError:
        try:
            length = str(len(self.loader.dataset))  # type: ignore[arg-type]
        except TypeError:
            length = "unknown"
        where = f" on rank {self.rank} of {self.world_size}" if self.world_size > 1 else ""
        return BatchError(
            f"the DataLoader (dataset of {length} samples){where} yielded no samples in epoch 0; "
            "pass data with at least one sample"
        )
