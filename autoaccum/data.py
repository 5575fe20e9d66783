"""Turning a user's data into *windows*: the micro-batches of one optimizer step.

A window holds exactly ``plan.per_rank`` samples of this rank (the last window of
an epoch may be short), split into micro-batches per ``plan.micro_sizes`` (or
``plan.window_sizes(n)`` for a short last window). Two kinds of data are handled:

* a **DataLoader over a map-style dataset** is re-batched: autoaccum keeps the
  user's dataset, sampler order, collate_fn and worker settings, but cuts the
  index order into micro index lists itself, so that every micro-batch is collated
  on its own (a padding collate_fn pads each micro-batch to its own longest
  sample). The loader's ``batch_size`` and ``drop_last`` do not matter: autoaccum
  never drops samples, the last window of an epoch is short instead. In a
  distributed run each rank reads its share through a DistributedSampler (the
  user's, or one autoaccum builds, shuffling iff the loader shuffled), so global
  window k is samples ``k·target_batch .. (k+1)·target_batch - 1`` of the epoch's
  order; like any DDP run, DistributedSampler repeats a few samples so that the
  dataset divides evenly among the ranks. A custom batch_sampler (e.g. bucketing)
  keeps only its order of indices: its grouping is replaced by autoaccum's windows.
* **any other iterable of batches** (a list of batches, a generator, a DataLoader
  over an IterableDataset) is re-chunked along dim 0: batches are sliced and
  joined so that windows and micro-batches have exactly the planned sizes. Such
  data is rank-local: in a distributed run each rank's iterable must already
  hold that rank's own share of the data.
"""

from __future__ import annotations

import inspect
import math
from collections import deque
from collections.abc import Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)
from torch.utils.data._utils.collate import default_collate, default_convert

from autoaccum.errors import BatchError, ConfigError
from autoaccum.plan import Plan, check_count
from autoaccum.tree import batch_size, concat_batches, slice_batch

__all__ = ["Window", "WindowStream"]

# DataLoader settings carried over to the re-batching loader, when this torch has them.
_LOADER_SETTINGS = (
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


@dataclass(frozen=True)
class Window:
    """The data of one optimizer step on this rank."""

    index: int
    """0-based index of the window within its epoch."""
    micro_batches: tuple[Any, ...]
    """Host (CPU) batches, one per micro-step, in order."""
    samples: int
    """Samples in this window on this rank (the sum of the micro-batch sizes)."""


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


def _fork_base_seed(generator: torch.Generator | None) -> torch.Generator:
    """Draw the workers' base seed as the user's own loader would, and replay it elsewhere.

    A DataLoader draws a base seed (from its generator, or torch's global RNG) when
    an epoch starts, *before* its sampler draws the permutation. We draw the same
    value at the same point so that a RandomSampler yields the very permutation the
    user's loader would, and return a copy of the generator's state from before the
    draw: the re-batching loader draws its base seed from that copy, so the workers
    get the user's seeds and the real RNG advances exactly once per epoch, as it
    would with the user's loader.
    """
    source = generator if generator is not None else torch.default_generator
    replay = torch.Generator(device=source.device)
    replay.set_state(source.get_state())
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    return replay


def _measure(batch: Any, index: int) -> int:
    """``batch_size(batch)``, with an error that says which batch of the data was wrong."""
    try:
        return batch_size(batch)
    except BatchError as err:
        raise BatchError(
            f"batch {index} of the data (a {type(batch).__name__}) cannot be used: {err}"
        ) from err


def _cut_window(index: int, pieces: Iterable[tuple[Any, int]], sizes: Sequence[int]) -> Window:
    """A window whose micro-batches of ``sizes`` are cut from consecutive ``pieces``.

    A micro-batch inside one piece is a slice of it (no copy); one that spans
    pieces is joined with :func:`concat_batches`.
    """
    queue = deque(pieces)
    micro_batches = []
    for size in sizes:
        parts, need = [], size
        while need:
            piece, n = queue[0]
            if n <= need:
                parts.append(piece)
                queue.popleft()
                need -= n
            else:
                parts.append(slice_batch(piece, 0, need))
                queue[0] = (slice_batch(piece, need, n), n - need)
                need = 0
        micro_batches.append(concat_batches(parts))
    return Window(index=index, micro_batches=tuple(micro_batches), samples=sum(sizes))


class WindowStream:
    """The user's data as windows of micro-batches, epoch after epoch, for one rank.

    ``data`` is a DataLoader over a map-style dataset (re-batched, see
    :attr:`is_loader`) or any other iterable of batches (re-chunked, rank-local).
    ``rank`` and ``world_size`` say which share of a DataLoader's dataset this
    process reads; ``seed`` seeds the DistributedSampler built for a shuffling
    loader in a distributed run, so that all ranks agree on the permutation.
    """

    def __init__(
        self, data: Iterable[Any], *, rank: int = 0, world_size: int = 1, seed: int = 0
    ) -> None:
        self.world_size = check_count("world_size", world_size)
        self.rank = check_count("rank", rank, minimum=0)
        if rank >= world_size:
            raise ConfigError(
                f"rank {rank} is out of range for world_size {world_size}; ranks are "
                f"0..{world_size - 1}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
        self.seed = seed
        self._data = data
        # DataLoader path: where the index order comes from, and the epoch-0 order
        # (with its replayable generator) drawn early by sample_batch().
        self._sampler: Iterable[Any] | None = None
        self._batch_sampler: Iterable[Sequence[Any]] | None = None
        self._collate_fn: Any = None
        self._micro_lists = _MicroIndexLists()
        self._inner: DataLoader[Any] | None = None
        self._epoch0: tuple[list[Any], torch.Generator | None] | None = None
        # Iterable path: the batches sample_batch() took and the iterator they came
        # from, replayed at the start of epoch 0.
        self._replay: tuple[list[tuple[Any, int]], Iterator[Any]] | None = None
        if self.is_loader:
            self._setup_loader()

    # ------------------------------------------------------------------ public

    @property
    def is_loader(self) -> bool:
        """True when ``data`` is a DataLoader over a map-style dataset, which we re-batch."""
        return isinstance(self._data, DataLoader) and not isinstance(
            self._data.dataset, IterableDataset
        )

    def samples_per_epoch(self) -> int | None:
        """Samples this rank sees per epoch, or None when that is not knowable up front.

        Known for a DataLoader whose sampler has a length (a DistributedSampler pads
        the dataset to a multiple of ``world_size``, as in any DDP run) and for a
        list or tuple of batches; unknown for a custom batch_sampler, generators and
        iterable datasets.
        """
        if self.is_loader:
            if self._batch_sampler is not None or not isinstance(self._sampler, Sized):
                return None
            return len(self._sampler)
        if isinstance(self._data, Sequence) and not isinstance(self._data, (str, bytes)):
            return sum(_measure(batch, i) for i, batch in enumerate(self._data))
        return None

    def num_windows(self, plan: Plan) -> int | None:
        """Windows (optimizer steps) per epoch on this rank, or None when not knowable."""
        self._check_plan(plan)
        samples = self.samples_per_epoch()
        if samples is None:
            return None
        return math.ceil(samples / plan.per_rank)

    def sample_batch(self, size: int) -> Any:
        """One host batch of the first ``min(size, available)`` samples of epoch 0 on this rank.

        Used to probe memory with real samples, collated together as one batch (for a
        DataLoader: one collate_fn call over those indices, so padding is realistic).
        It does not disturb later iteration: a DataLoader's epoch-0 order is drawn
        once and kept for epoch 0, and the batches taken from an iterable are kept
        and replayed at the start of epoch 0 (so a one-shot generator loses nothing).
        Call it before :meth:`windows` of epoch 0.
        """
        check_count("size", size)
        if self.is_loader:
            if self._epoch0 is None:
                self._epoch0 = self._draw_order(0)
            indices = self._epoch0[0][:size]
            if not indices:
                raise self._empty_error()
            return self._collate(indices)
        if self._replay is None:
            self._replay = ([], iter(self._data))
        taken, source = self._replay
        have = sum(n for _, n in taken)
        while have < size:
            batch = next(source, _END)
            if batch is _END:
                break
            n = _measure(batch, len(taken))
            taken.append((batch, n))
            have += n
        if have == 0:
            raise self._empty_error()
        parts, need = [], min(size, have)
        for batch, n in taken:
            if need == 0:
                break
            if n:
                parts.append(batch if n <= need else slice_batch(batch, 0, need))
                need -= min(n, need)
        return concat_batches(parts)

    def windows(self, plan: Plan, epoch: int) -> Iterator[Window]:
        """This rank's windows of ``epoch``, in order, each ``plan.per_rank`` samples.

        The last window may be short; it is split by ``plan.window_sizes``. Epoch 0
        with no samples at all is a :class:`BatchError`. A one-shot iterator (a
        generator) yields its windows in epoch 0 and nothing in later epochs.
        """
        self._check_plan(plan)
        check_count("epoch", epoch, minimum=0)
        if self.is_loader:
            return self._loader_windows(plan, epoch)
        return self._iterable_windows(plan, epoch)

    # -------------------------------------------------------------- DataLoader

    def _setup_loader(self) -> None:
        loader = self._user_loader()
        user_batch_sampler = loader.batch_sampler
        if user_batch_sampler is None or type(user_batch_sampler) is BatchSampler:
            # A plain BatchSampler only groups its sampler's order; take that order.
            sampler = loader.sampler if user_batch_sampler is None else user_batch_sampler.sampler
            self._sampler = self._rank_sampler(sampler)
        elif self.world_size > 1:
            raise ConfigError(
                f"the DataLoader has a custom batch_sampler ({type(user_batch_sampler).__name__}), "
                "which autoaccum cannot shard across ranks; pass a DataLoader with "
                "sampler=DistributedSampler(dataset) instead (autoaccum makes the batches)"
            )
        else:
            # Its grouping (e.g. bucketing) is replaced by autoaccum's windows; only
            # the order of its indices is kept.
            self._batch_sampler = user_batch_sampler
        self._collate_fn = loader.collate_fn
        if loader.batch_sampler is None:  # batch_size=None: collate_fn sees single samples
            if loader.collate_fn is not default_convert:
                raise ConfigError(
                    "the DataLoader has batch_size=None with a custom collate_fn, which then "
                    "takes one sample at a time; autoaccum collates a list of samples per "
                    "micro-batch. Pass batch_size=1 (autoaccum picks the micro-batch sizes) "
                    "and a collate_fn that takes a list of samples"
                )
            self._collate_fn = default_collate

    def _rank_sampler(self, sampler: Iterable[Any]) -> Iterable[Any]:
        """The sampler giving this rank's index order."""
        loader = self._user_loader()
        if isinstance(sampler, DistributedSampler):
            if sampler.num_replicas != self.world_size or sampler.rank != self.rank:
                raise ConfigError(
                    f"the DataLoader's DistributedSampler is for rank {sampler.rank} of "
                    f"{sampler.num_replicas}, but this process is rank {self.rank} of "
                    f"{self.world_size}; build it with num_replicas={self.world_size}, "
                    f"rank={self.rank}, or let autoaccum build it (pass shuffle=True/False)"
                )
            return sampler
        if self.world_size == 1:
            return sampler
        if isinstance(sampler, (SequentialSampler, RandomSampler)):
            return DistributedSampler(
                loader.dataset,
                num_replicas=self.world_size,
                rank=self.rank,
                shuffle=isinstance(sampler, RandomSampler),
                seed=self.seed,
                drop_last=False,
            )
        raise ConfigError(
            f"the DataLoader's sampler ({type(sampler).__name__}) cannot be sharded across "
            f"{self.world_size} ranks by autoaccum; pass a DataLoader with "
            "sampler=DistributedSampler(dataset, num_replicas=world_size, rank=rank), "
            "or shuffle=True/False and let autoaccum build one"
        )

    def _user_loader(self) -> DataLoader[Any]:
        """The user's DataLoader (only called on the DataLoader path)."""
        assert isinstance(self._data, DataLoader)  # guaranteed by is_loader, not user input
        return self._data

    def _draw_order(self, epoch: int) -> tuple[list[Any], torch.Generator | None]:
        """This rank's index order for ``epoch``, and the generator for the workers' seed.

        The generator is None when the user's loader would draw no base seed this
        epoch (persistent workers are seeded once, at their first epoch).
        """
        loader = self._user_loader()
        persistent = loader.persistent_workers and loader.num_workers > 0
        replay = None
        if not (persistent and self._inner is not None):
            replay = _fork_base_seed(loader.generator)
        source = self._batch_sampler if self._batch_sampler is not None else self._sampler
        set_epoch = getattr(source, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        if self._batch_sampler is not None:
            order = [index for group in self._batch_sampler for index in group]
        else:
            assert self._sampler is not None
            order = list(self._sampler)
        return order, replay

    def _collate(self, indices: list[Any]) -> Any:
        """One batch of ``indices`` fetched and collated as a DataLoader worker would."""
        loader = self._user_loader()
        dataset = loader.dataset
        getitems = getattr(dataset, "__getitems__", None)
        samples = getitems(indices) if getitems else [dataset[i] for i in indices]
        return self._collate_fn(samples)

    def _inner_loader(self, replay: torch.Generator | None) -> DataLoader[Any]:
        """The re-batching loader over ``self._micro_lists`` (created once, reused)."""
        loader = self._user_loader()
        if self._inner is None:
            accepted = inspect.signature(DataLoader.__init__).parameters
            settings = {
                name: getattr(loader, name)
                for name in _LOADER_SETTINGS
                if name in accepted and hasattr(loader, name)
            }
            settings["collate_fn"] = self._collate_fn
            if not settings.get("pin_memory_device"):
                settings.pop("pin_memory_device", None)  # deprecated; pass only if set
            self._inner = DataLoader(
                loader.dataset,
                batch_sampler=self._micro_lists,
                generator=replay,
                **settings,
            )
        elif replay is not None:
            self._inner.generator = replay
        return self._inner

    def _loader_windows(self, plan: Plan, epoch: int) -> Iterator[Window]:
        if epoch == 0 and self._epoch0 is not None:
            (order, replay), self._epoch0 = self._epoch0, None
        else:
            order, replay = self._draw_order(epoch)
        if epoch == 0 and not order:
            raise self._empty_error()
        micro_lists: list[list[Any]] = []
        window_sizes: list[tuple[int, ...]] = []
        for start in range(0, len(order), plan.per_rank):
            window = order[start : start + plan.per_rank]
            sizes = plan.window_sizes(len(window))
            window_sizes.append(sizes)
            offset = 0
            for size in sizes:
                micro_lists.append(window[offset : offset + size])
                offset += size
        return self._run_loader(replay, micro_lists, window_sizes)

    def _run_loader(
        self,
        replay: torch.Generator | None,
        micro_lists: list[list[Any]],
        window_sizes: list[tuple[int, ...]],
    ) -> Iterator[Window]:
        inner = self._inner_loader(replay)
        self._micro_lists.lists = micro_lists  # replaced, never mutated: old epochs keep theirs
        batches = iter(inner)
        for index, sizes in enumerate(window_sizes):
            micro_batches = tuple(next(batches) for _ in sizes)
            yield Window(index=index, micro_batches=micro_batches, samples=sum(sizes))

    # ---------------------------------------------------------------- iterable

    def _iterable_windows(self, plan: Plan, epoch: int) -> Iterator[Window]:
        taken: list[tuple[Any, int]] = []
        if epoch == 0 and self._replay is not None:
            (taken, source), self._replay = self._replay, None
        elif epoch > 0 and isinstance(self._data, Iterator):
            return iter(())  # a one-shot iterator has nothing left after epoch 0
        else:
            source = iter(self._data)
        return self._rechunk(plan, epoch, taken, source)

    def _rechunk(
        self, plan: Plan, epoch: int, taken: list[tuple[Any, int]], source: Iterator[Any]
    ) -> Iterator[Window]:
        """Slice and join the source batches into windows of ``plan.per_rank`` samples.

        At most one window of samples is held (plus the source batch being cut).
        """
        per_rank = plan.per_rank
        pieces: list[tuple[Any, int]] = []
        have = total = index = 0

        def measured() -> Iterator[tuple[Any, int]]:
            yield from taken
            for batch_index, batch in enumerate(source, start=len(taken)):
                yield batch, _measure(batch, batch_index)

        for batch, n in measured():
            total += n
            start = 0
            while start < n:
                take = min(per_rank - have, n - start)
                piece = batch if take == n else slice_batch(batch, start, start + take)
                pieces.append((piece, take))
                have += take
                start += take
                if have == per_rank:
                    window = _cut_window(index, pieces, plan.micro_sizes)
                    pieces, have, index = [], 0, index + 1
                    yield window
        if have:
            yield _cut_window(index, pieces, plan.window_sizes(have))
        elif epoch == 0 and total == 0:
            raise self._empty_error()

    # ----------------------------------------------------------------- helpers

    def _check_plan(self, plan: Plan) -> None:
        if plan.world_size != self.world_size:
            raise ConfigError(
                f"the plan is for world_size {plan.world_size} but this data stream is for "
                f"world_size {self.world_size}; make the plan with world_size={self.world_size}"
            )

    def _empty_error(self) -> BatchError:
        if self.is_loader:
            what = f"the DataLoader (dataset of {_length(self._data)} samples)"
            if self.world_size > 1:
                what += f" on rank {self.rank} of {self.world_size}"
        else:
            what = f"the data ({type(self._data).__name__})"
        return BatchError(
            f"{what} yielded no samples in epoch 0; pass data with at least one sample"
        )


_END = object()


def _length(loader: Any) -> str:
    try:
        return str(len(loader.dataset))
    except TypeError:
        return "unknown"
