"""Turning a user's data into *windows*: the micro-batches of one optimizer step.

A window holds exactly ``plan.per_rank`` samples of this rank (the last window of an
epoch may be short), split into micro-batches per ``plan.micro_sizes`` (or
``plan.window_sizes(n)`` for a short last window). Two strategies, one module each:

* :class:`~autoaccum.train.data.loader.LoaderWindows` re-batches a DataLoader over a
  map-style dataset (every micro-batch collated on its own);
* :class:`~autoaccum.train.data.iterable.IterableWindows` re-chunks any other iterable
  of batches along dim 0 (rank-local data).

:func:`window_source` picks the one that fits the data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from torch.utils.data import DataLoader, IterableDataset

from autoaccum.errors import BatchError, ConfigError, check_count
from autoaccum.plan import Plan, Plans
from autoaccum.step.ranks import Ranks
from autoaccum.train.data.cut import Window
from autoaccum.train.data.iterable import IterableWindows
from autoaccum.train.data.loader import LoaderWindows

__all__ = ["Window", "WindowSource", "as_source", "check_evaluation_data", "window_source"]


class WindowSource(Protocol):
    """What training reads its windows from."""

    #: True when each rank holds its own data (windows are agreed on across ranks)
    rank_local: bool

    def samples_per_epoch(self) -> int | None: ...

    def dataset_size(self) -> int | None:
        """The length of the dataset every rank shares (None: rank-local or unknown)."""
        ...

    def num_windows(self, plans: Plan | Plans) -> int | None: ...

    def sample_batch(self, size: int) -> Any: ...

    def probe_batch(self, size: int, size_fn: Any = None) -> tuple[Any, str]:
        """The batch to probe with, and what it is, in words."""
        ...

    def windows(self, plans: Plan | Plans, epoch: int, *, skip: int = 0) -> Iterator[Window]: ...

    def epoch_state(self, epoch: int) -> object | None:
        """What an exact resume needs to draw ``epoch``'s order again."""
        ...

    def restore_epoch(self, epoch: int, state: object) -> None:
        """Draw ``epoch``'s order again from ``epoch_state(epoch)``'s state."""
        ...


def window_source(
    data: Iterable[Any],
    *,
    rank: int = 0,
    world_size: int = 1,
    share_order: Callable[[list[Any]], list[Any]] | None = None,
) -> WindowSource:
    """The windows of ``data`` for this rank: a DataLoader over a map-style dataset is
    re-batched, anything else iterable is re-chunked.

    ``rank`` and ``world_size`` say which share of every window of a DataLoader's dataset this
    process reads; ``share_order`` makes the epoch's order rank 0's on every rank
    (:meth:`~autoaccum.step.ranks.Ranks.share`).
    """
    world_size = check_count("world_size", world_size)
    rank = check_count("rank", rank, minimum=0)
    if rank >= world_size:
        raise ConfigError(
            f"rank {rank} is out of range for world_size {world_size}; ranks are "
            f"0..{world_size - 1}"
        )
    if isinstance(data, DataLoader) and not isinstance(data.dataset, IterableDataset):
        return LoaderWindows(data, rank=rank, world_size=world_size, share_order=share_order)
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise ConfigError(
            f"the data must be a DataLoader or an iterable of batches, got {type(data).__name__}"
        )
    return IterableWindows(data)


def as_source(data: Any, ranks: Ranks, *, tokens: Any = None) -> WindowSource:
    """``data`` when it is a window source already, else :func:`window_source` of it for this
    rank among ``ranks`` (which share the epoch's order); with ``tokens`` (the count function
    of ``target_tokens``), windows of loss tokens."""
    if isinstance(data, (LoaderWindows, IterableWindows)):
        return data
    share = ranks.share if ranks.multi else None
    if tokens is None:
        return window_source(data, rank=ranks.rank, world_size=ranks.size, share_order=share)
    if not isinstance(data, DataLoader) or isinstance(data.dataset, IterableDataset):
        raise ConfigError(
            f"target_tokens reads every sample's loss tokens up front, so it needs a DataLoader "
            f"over a map-style dataset (one with __getitem__ and __len__), not a "
            f"{type(data).__name__}; for other data use target_batch"
        )
    from autoaccum.train.data.tokens import TokenWindows

    return TokenWindows(
        data, count_fn=tokens, rank=ranks.rank, world_size=ranks.size, share_order=share
    )


def check_evaluation_data(data: object) -> None:
    """A clear error, at the start, for evaluation data that is empty where that can be known."""
    dataset = getattr(data, "dataset", None)
    try:
        length = len(dataset if dataset is not None else data)  # type: ignore[arg-type]
    except TypeError:
        return  # an iterable of unknown length: checked when it is read
    if length == 0:
        raise BatchError(
            f"the evaluation data ({type(data).__name__}) is empty: Evaluate needs at least one "
            "sample; pass the evaluation DataLoader or list of batches you meant"
        )
