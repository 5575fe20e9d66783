"""Windows of exactly T loss tokens (``target_tokens``), their micro-batches packed by memory.

For language data the unit of a batch is the token: with variable-length texts a fixed number
of samples per step trains on a token count that swings by several times from step to step.
Here window k holds tokens ``k·T … (k+1)·T − 1`` of the epoch's token stream (the samples in
the user's loader's order, each sample's loss tokens in a row), so every optimizer step trains
on exactly T loss tokens over all ranks, and every loss token of the epoch counts once.

* **The sample that crosses the budget is split at the token level**: its label positions past
  the budget are masked (``-100``) in this window, and the same sample opens the next window
  with the complementary mask; its forward runs twice. This needs labels that can be masked:
  a dict sample's ``labels`` (or the key of :func:`~autoaccum.count_tokens`), or the targets of
  an ``(inputs, targets)`` pair, with the count's shift. Where the loss cannot be split (a
  count function of the user's own), a window holds whole samples, the fewest whose tokens
  reach T, and is weighted by its true count.
* **Micro-batches are packed under a budget of padded tokens** (samples × the longest of
  them, what a padding collate allocates): the probe measures the heaviest samples, and the
  budget is that many of them at their length. Within a window each rank's samples are
  ordered longest first (the order is fixed, so a resume is bit-identical) and packed
  (:mod:`~autoaccum.train.data.packing`): the fewest micro-steps whose padding stays within
  5 % of the tokens.
* **Ranks share a window's tokens** as evenly as its samples allow (each rank a run of whole
  pieces of the window); ranks may run different numbers of micro-steps.

Every sample's loss-token count and length are read once per run (one pass over the dataset,
samples fetched but not collated).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from autoaccum.errors import ConfigError
from autoaccum.plan import Plan, Plans, even_split, plans_of
from autoaccum.step.rng import preserved_rng
from autoaccum.train.data.cut import Window
from autoaccum.train.data.labels import Labels, labels_of
from autoaccum.train.data.loader import LoaderWindows
from autoaccum.train.data.packing import pack

__all__ = ["Piece", "TokenWindows", "token_upper"]


@dataclass(frozen=True)
class Piece:
    """A sample of the dataset with only its loss tokens ``lo … hi − 1`` kept (the part of it
    one window holds)."""

    index: Any
    lo: int
    hi: int


class _Pieces(Dataset[Any]):
    """The dataset, fetched by index or by :class:`Piece` (masked)."""

    def __init__(self, dataset: Any, labels: Labels | None) -> None:
        self.dataset = dataset
        self.labels = labels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> Any:
        if not isinstance(key, Piece):
            return self.dataset[key]
        sample = self.dataset[key.index]
        assert self.labels is not None  # pieces only where labels can be split
        positions = self.labels.positions(sample) or []
        return self.labels.masked(sample, positions[key.lo : key.hi])


def _length(sample: Any) -> int:
    """How long a sample is: its longest sequence (what a padding collate pads to)."""
    if isinstance(sample, torch.Tensor):
        return int(sample.shape[0]) if sample.dim() else 1
    values = sample.values() if isinstance(sample, Mapping) else sample
    if not isinstance(values, (list, tuple)) and not isinstance(sample, Mapping):
        return 1
    sizes = [len(v) for v in values if isinstance(v, (list, tuple, str))]
    sizes += [int(v.shape[0]) for v in values if isinstance(v, torch.Tensor) and v.dim() > 0]
    return max(sizes, default=1)


class TokenWindows(LoaderWindows):
    """The windows of a DataLoader over a map-style dataset by loss tokens, for one rank."""

    def __init__(
        self,
        loader: DataLoader[Any],
        *,
        count_fn: Callable[[Any], Any],
        rank: int = 0,
        world_size: int = 1,
        share_order: Callable[[list[Any]], list[Any]] | None = None,
    ) -> None:
        super().__init__(loader, rank=rank, world_size=world_size, share_order=share_order)
        if not self.global_order:
            raise ConfigError(
                "target_tokens shares every window's tokens among the ranks itself: pass the "
                "DataLoader without a DistributedSampler"
            )
        self.count_fn = count_fn
        self._index: tuple[list[int], list[int]] | None = None  #: tokens and length, by index
        self._whole: set[int] = set()  #: samples whose labels cannot be found: never split

    def splits(self) -> bool:
        """Whether a sample crossing the budget is split (its labels can be masked)."""
        return self._unsplit() is None

    def _unsplit(self) -> str | None:
        """Why samples cannot be split (None: they can)."""
        labels = labels_of(self.count_fn)
        if labels is None:
            name = getattr(self.count_fn, "__name__", type(self.count_fn).__name__)
            return f"count_fn {name} is a count of your own, which says how many but not where"
        with preserved_rng():
            first = self.loader.dataset[0]
        if labels.positions(first) is None:
            key = "labels" if labels.key is None else labels.key
            return (
                f"the dataset's samples carry no row of {key!r} the count can find before "
                "collation (labels made by the collate_fn cannot be masked per sample)"
            )
        return None

    def index(self) -> tuple[list[int], list[int]]:
        """Every sample's loss tokens and length, read once (in index order)."""
        if self._index is None:
            dataset = self.loader.dataset
            unsplit = self._unsplit()
            if unsplit is not None and self.rank == 0:
                warnings.warn(_whole_samples(unsplit), stacklevel=2)
            labels = labels_of(self.count_fn) if unsplit is None else None
            tokens, lengths = [], []
            with preserved_rng():
                for i in range(len(dataset)):  # type: ignore[arg-type]
                    sample = dataset[i]
                    positions = labels.positions(sample) if labels is not None else None
                    if positions is None:
                        tokens.append(int(self.count_fn(self._collate_fn([sample]))))
                        self._whole.add(i)
                    else:
                        tokens.append(len(positions))
                    lengths.append(_length(sample))
            self._index = (tokens, lengths)
        return self._index

    def heaviest_tokens(self, count: int) -> int:
        """The loss tokens of the longest sample (at least 1): how many of them a rank's share
        of a window can hold."""
        tokens, lengths = self.index()
        longest = max(range(len(lengths)), key=lambda i: (lengths[i], tokens[i]))
        return max(1, tokens[longest]) * count

    def longest(self) -> int:
        return max(self.index()[1])

    def _dataset(self) -> Any:
        labels = labels_of(self.count_fn) if self.splits() else None
        return _Pieces(self.loader.dataset, labels)

    def windows(self, plans: Plan | Plans, epoch: int, *, skip: int = 0) -> Iterator[Window]:
        """The windows of ``epoch``: window k of ``plans(k).tokens`` loss tokens, packed under
        the budget of the epoch's first plan (see :meth:`token_windows`)."""
        plan_of = plans_of(plans)
        return self.token_windows(lambda k: plan_of(k).tokens, plan_of(0).budget, epoch, skip=skip)

    def num_windows(self, plans: Plan | Plans) -> int | None:
        plan_of = plans_of(plans)
        return self.num_token_windows(lambda k: plan_of(k).tokens)

    def token_windows(
        self, targets: Callable[[int], int], budget: int, epoch: int, *, skip: int = 0
    ) -> Iterator[Window]:
        """This rank's share of every window of ``epoch``: window k holds ``targets(k)`` loss
        tokens over all ranks (the last one fewer), micro-batches of at most ``budget`` padded
        tokens (one sample more when a single sample is longer)."""
        order, replay = self._draw(epoch)
        if epoch == 0 and not order:
            raise self._empty_error()
        tokens, lengths = self.index()
        micro_lists: list[list[Any]] = []
        layout: list[tuple[int, tuple[int, ...], int, str, bool, int]] = []
        continued: dict[int, int] = {}  #: window → its samples whose last tokens come later
        for index, (pieces, target) in enumerate(self._cut(order, targets)):
            held = sum(p.hi - p.lo for p in pieces)
            if held < target and self.loader.drop_last:
                if index >= skip:
                    dropped = len(pieces) if self.rank == 0 else 0
                    why = "the DataLoader has drop_last=True"
                    layout.append((index, (), dropped, why, False, target))
                continue
            if index < skip:
                continue
            mine = _share(pieces, self.world_size)[self.rank]
            runs = pack([lengths[p.index] for p in mine], budget)
            groups = [[mine[i] for i in run] for run in runs]
            layout.append((index, tuple(len(g) for g in groups), 0, "", True, target))
            micro_lists.extend([_key(p, tokens) for p in group] for group in groups)
            continued[index] = sum(1 for p in mine if p.hi < tokens[p.index])
        windows = self._fetch(replay, micro_lists, layout, epoch)
        return (dataclasses.replace(w, continued=continued.get(w.index, 0)) for w in windows)

    def _cut(
        self, order: list[Any], targets: Callable[[int], int]
    ) -> Iterator[tuple[list[Piece], int]]:
        """The windows' pieces, in order: each ``targets(k)`` loss tokens (or whole samples
        reaching it, where samples cannot be split)."""
        tokens = self.index()[0]
        split = self.splits()
        pos, lo, k = 0, 0, 0
        while pos < len(order):
            target = need = targets(k)
            if target < 1:
                raise ConfigError(f"window {k} was given a target of {target} loss tokens")
            pieces: list[Piece] = []
            while pos < len(order) and (need > 0 or not pieces):
                index = order[pos]
                have = tokens[index] - lo
                take = min(need, have) if split and index not in self._whole else have
                pieces.append(Piece(index, lo, lo + take))
                need -= take
                lo += take
                if lo >= tokens[index]:
                    pos, lo = pos + 1, 0
            while pos < len(order) and tokens[order[pos]] == 0:  # nothing to train: ride along
                pieces.append(Piece(order[pos], 0, 0))
                pos += 1
            yield pieces, target
            k += 1

    def num_token_windows(self, targets: Callable[[int], int]) -> int:
        """Windows in an epoch (its order does not change their number)."""
        order = list(range(len(self.index()[0])))
        return sum(
            1
            for pieces, target in self._cut(order, targets)
            if not self.loader.drop_last or sum(p.hi - p.lo for p in pieces) >= target
        )


def _whole_samples(why: str) -> str:
    return (
        f"target_tokens: {why}, so a sample that crosses the budget cannot be split between "
        "two windows: every window holds whole samples, the fewest whose loss tokens reach the "
        "target (a step may train up to one sample's tokens more), each step weighted by its "
        "true count. For exactly the target at every step, give every sample its labels (a "
        "dict sample's 'labels', or (inputs, targets)) and count them with "
        "autoaccum.count_tokens()"
    )


def _key(piece: Piece, tokens: list[int]) -> Any:
    """What the inner loader fetches: the index of a whole sample, or the piece."""
    whole = piece.lo == 0 and piece.hi >= tokens[piece.index]
    return piece.index if whole else piece


def _share(pieces: list[Piece], world: int) -> list[list[Piece]]:
    """A window's pieces in ``world`` runs of as even token counts as whole pieces allow."""
    total = sum(p.hi - p.lo for p in pieces)
    bounds = [sum(even_split(total, world)[:r]) for r in range(world + 1)]
    out: list[list[Piece]] = [[] for _ in range(world)]
    seen = 0
    for piece in pieces:
        middle = seen + (piece.hi - piece.lo) / 2  # a piece goes where its middle falls
        rank = next(r for r in range(world) if middle < bounds[r + 1] or r == world - 1)
        out[rank].append(piece)
        seen += piece.hi - piece.lo
    return out


def token_upper(source: TokenWindows, share_tokens: int) -> int:
    """How many of the longest samples the probe tries at most: enough to carry a rank's
    share of a window's tokens."""
    return max(1, math.ceil(share_tokens / source.heaviest_tokens(1)))
