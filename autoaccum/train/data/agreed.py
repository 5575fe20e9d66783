"""An epoch's windows as every rank reads them together: the epoch starts on every rank at
once (ranks that share one dataset must hold the same one), samples left out are counted,
and with rank-local data the ranks agree before each window that all of them have one."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

from autoaccum.errors import DistributedError
from autoaccum.plan import Plan, Plans
from autoaccum.step.ranks import Ranks
from autoaccum.train.data import WindowSource
from autoaccum.train.data.cut import Window

__all__ = ["epoch_windows", "warn_dropped", "warn_larger_than_data"]


def epoch_windows(
    source: WindowSource,
    plans: Plan | Plans,
    epoch: int,
    *,
    ranks: Ranks,
    skip: int = 0,
    dropped: Callable[[Window], None] = lambda window: None,
) -> Iterator[Window]:
    """``source``'s windows of ``epoch`` (from window ``skip``), read together on every rank.

    ``dropped(window)`` is told of every window that left samples out. A shared window is
    yielded on every rank, also where this rank's share of it is empty; with rank-local data
    the epoch ends on every rank when the first runs out.
    """
    _start_epoch(source, ranks)
    for window in ranks.iterate(source.windows(plans, epoch, skip=skip)):
        dropped(window)
        if source.rank_local and not _all_have(ranks, len(window.micro_batches)):
            return
        if window.micro_batches or (window.anywhere and not source.rank_local):
            yield window  # a shared window some rank trains: every rank takes part
    if source.rank_local:
        _all_have(ranks, 0)  # tell the ranks still holding data to stop


def _start_epoch(source: WindowSource, ranks: Ranks) -> None:
    """Every rank starts the epoch together; ranks that share one dataset (a DataLoader
    autoaccum shards) must hold the same one, or their windows would part ways."""
    shared = None if source.rank_local else source.dataset_size()
    where = "starting an epoch"
    agreed = ranks.agree(where, each=-1 if shared is None else shared, where=where)
    if shared is not None and not agreed.each_equal:
        lengths = ", ".join(f"rank {r}: {n}" for r, n in enumerate(agreed.each))
        raise DistributedError(
            f"the ranks' DataLoaders hold datasets of different lengths ({lengths}): autoaccum "
            "shards one dataset among the ranks, so every rank must pass a DataLoader over the "
            "same dataset. For data each rank reads on its own, pass an iterable of batches "
            "(its epoch ends when the first rank runs out)"
        )


def _all_have(ranks: Ranks, micro_steps: int) -> bool:
    agreed = ranks.agree(
        "checking that every rank has a window (rank-local data)",
        missing=micro_steps == 0,
        each=micro_steps,
    )
    return not agreed.missing


def warn_larger_than_data(source: WindowSource, plan: Plan, world_size: int) -> None:
    """One warning when ``plan``'s target is larger than a whole epoch of ``source``."""
    samples = source.samples_per_epoch()
    if not samples or samples >= plan.per_rank or plan.tokens:
        return
    total = samples * world_size
    warnings.warn(
        f"target_batch {plan.target_batch} is larger than the whole epoch (about {total} "
        f"samples over {world_size} rank(s)): every optimizer step trains on all of it, one "
        f"short window per epoch. Lower target_batch to at most {total} for several steps per "
        "epoch",
        UserWarning,
        stacklevel=5,
    )


def warn_dropped(window: Window) -> int:
    """The samples ``window`` left out, warned about (0: none)."""
    if window.dropped:
        warnings.warn(
            f"{window.dropped} sample(s) of window {window.index} of epoch {window.epoch} were "
            f"not trained: {window.dropped_because}. FitResult.samples_dropped counts them",
            UserWarning,
            stacklevel=5,
        )
    return window.dropped
