"""Re-chunking any other iterable of batches into windows of micro-batches.

A list of batches, a generator, a DataLoader over an IterableDataset: batches are sliced
and joined along dim 0 so that windows and micro-batches have exactly the planned sizes.
At most one window of samples is held (plus the source batch being cut). Such data is
rank-local: in a distributed run each rank's iterable must already hold that rank's own
share of the data.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from autoaccum.errors import BatchError, check_count
from autoaccum.plan import Plan, Plans, plans_of
from autoaccum.step.batches import concat_batches, slice_batch
from autoaccum.train.data.cut import Window, cut_window, measure, too_small

__all__ = ["IterableWindows"]

_END = object()


class IterableWindows:
    """The windows of an iterable of batches, re-chunked along dim 0, for one rank."""

    #: each rank's iterable holds that rank's own share: windows must be agreed on
    rank_local = True

    def __init__(self, data: Iterable[Any]) -> None:
        self.data = data
        #: the batches sample_batch() took and the iterator they came from, replayed at the
        #: start of epoch 0 (so a one-shot generator loses nothing)
        self._replay: tuple[list[tuple[Any, int]], Iterator[Any]] | None = None

    def samples_per_epoch(self) -> int | None:
        """Samples per epoch for a list or tuple of batches; None for anything else."""
        if isinstance(self.data, Sequence) and not isinstance(self.data, (str, bytes)):
            return sum(measure(batch, i) for i, batch in enumerate(self.data))
        return None

    def dataset_size(self) -> None:
        """None: each rank's iterable is its own (rank-local) data."""
        return

    def num_windows(self, plans: Plan | Plans) -> int | None:
        samples = self.samples_per_epoch()
        if samples is None:
            return None
        plan_of, start, count = plans_of(plans), 0, 0
        while start < samples:
            start += plan_of(count).per_rank
            count += 1
        return count

    def sample_batch(self, size: int) -> Any:
        """The first ``min(size, available)`` samples of epoch 0, taken from the data and kept
        for :meth:`windows` (taking them is the epoch's own work: nothing is drawn twice)."""
        check_count("size", size)
        if self._replay is None:
            self._replay = ([], iter(self.data))
        taken, source = self._replay
        have = sum(n for _, n in taken)
        while have < size:
            batch = next(source, _END)
            if batch is _END:
                break
            n = measure(batch, len(taken))
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

    def epoch_state(self, epoch: int) -> None:
        """Nothing: an iterable is read again from its start (see :meth:`windows`'s ``skip``)."""
        return

    def restore_epoch(self, epoch: int, state: object) -> None:
        """Nothing to draw: a resumed epoch re-reads the data and skips the windows done."""

    def probe_batch(self, size: int, size_fn: Any = None) -> tuple[Any, str]:
        """The first window's samples, and that they are: an iterable cannot be scanned for its
        heaviest samples (a later, longer batch is left to the out-of-memory recovery)."""
        batch = self.sample_batch(size)
        return batch, f"the first {size} samples (an iterable cannot be scanned for its heaviest)"

    def windows(self, plans: Plan | Plans, epoch: int, *, skip: int = 0) -> Iterator[Window]:
        """This epoch's windows, window k of ``plans(k).per_rank`` samples (of one plan's);
        the last one may be short.

        A one-shot iterator (a generator) yields its windows in epoch 0 and nothing later.
        The first ``skip`` windows are read and left out (a resumed run).
        """
        taken: list[tuple[Any, int]] = []
        if epoch == 0 and self._replay is not None:
            (taken, source), self._replay = self._replay, None
        elif epoch > 0 and isinstance(self.data, Iterator):
            return iter(())  # a one-shot iterator has nothing left after epoch 0
        else:
            source = iter(self.data)
        return self._rechunk(plans_of(plans), epoch, taken, source, skip)

    def _rechunk(
        self,
        plan_of: Plans,
        epoch: int,
        taken: list[tuple[Any, int]],
        source: Iterator[Any],
        skip: int,
    ) -> Iterator[Window]:
        pieces: list[tuple[Any, int]] = []
        have = total = index = 0
        plan = plan_of(0)

        def measured() -> Iterator[tuple[Any, int]]:
            yield from taken
            for batch_index, batch in enumerate(source, start=len(taken)):
                yield batch, measure(batch, batch_index)

        for batch, n in measured():
            total += n
            start = 0
            while start < n:
                take = min(plan.per_rank - have, n - start)
                piece = batch if take == n else slice_batch(batch, start, start + take)
                pieces.append((piece, take))
                have += take
                start += take
                if have == plan.per_rank:
                    if index >= skip:
                        window = cut_window(epoch, index, pieces, plan.micro_sizes, 0)
                        yield dataclasses.replace(window, target=plan.target_batch)
                    pieces, have, index = [], 0, index + 1
                    plan = plan_of(index)
        if have and index >= skip:
            sizes = plan.window_sizes(have)
            window = cut_window(epoch, index, pieces, sizes, have - sum(sizes))
            why = too_small(plan.min_micro)
            yield dataclasses.replace(window, dropped_because=why, target=plan.target_batch)
        elif epoch == 0 and total == 0:
            raise self._empty_error()

    def _empty_error(self) -> BatchError:
        return BatchError(
            f"the data ({type(self.data).__name__}) yielded no samples in epoch 0; pass data "
            "with at least one sample"
        )
