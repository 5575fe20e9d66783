"""The heaviest samples of a map-style dataset: what the probe should run on.

With variable-length data (text, audio, detection) a micro-batch's memory follows its
longest sample, since a padding ``collate_fn`` pads every micro-batch to it. A probe on the
first window's samples can pass at a size that a later, longer batch cannot hold. So, where
the dataset can be read by index, the probe runs on the heaviest samples: each sample is
weighed (``size_fn(sample)``, by default the total number of elements of its tensors and
per-sample lists) and the heaviest are collated together, padded to the longest of them;
every later micro-batch, padded to its own longest, is then no bigger than what was probed.
A large dataset is weighed on a seeded random subset of ``max_scan`` samples (the report
says so); the scan moves no random stream.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Any

import torch

from autoaccum.errors import ConfigError, check_count

__all__ = ["MAX_SCAN", "Heaviest", "SizeFn", "elements", "heaviest"]

#: Samples weighed at most; a larger dataset is weighed on a seeded random subset this big.
MAX_SCAN = 20_000

SizeFn = Callable[[Any], int]


def elements(sample: Any) -> int:
    """A sample's weight: the elements of its tensors plus the items of its per-sample lists
    and the characters of its strings, however they nest."""
    if isinstance(sample, torch.Tensor):
        return sample.numel()
    if isinstance(sample, (str, bytes)):
        return len(sample)
    if isinstance(sample, Mapping):
        return sum(elements(v) for v in sample.values())
    if isinstance(sample, (list, tuple)):
        return sum(_nested(v) for v in sample)
    numel = getattr(sample, "size", None)  # numpy arrays, PIL images (w × h)
    if isinstance(numel, int):
        return numel
    if isinstance(numel, tuple) and all(isinstance(n, int) for n in numel):
        return int(torch.tensor(numel).prod())
    return 1


def _nested(value: Any) -> int:
    return elements(value) if isinstance(value, (list, tuple, Mapping, torch.Tensor, str)) else 1


@dataclass(frozen=True)
class Heaviest:
    """The heaviest samples found, heaviest first, and what the scan covered."""

    indices: tuple[Any, ...]
    weights: tuple[int, ...]
    scanned: int
    total: int

    def describe(self) -> str:
        """E.g. "the 86 heaviest of 12 000 samples, 1024 down to 980 elements"."""
        if not self.indices:
            return "no sample"
        scope = f"{self.total:,}".replace(",", " ") + " samples"
        if self.scanned < self.total:
            scope += f" (a seeded random {self.scanned:,} of them weighed)".replace(",", " ")
        spread = (
            f"{self.weights[0]} elements each"
            if self.weights[0] == self.weights[-1]
            else f"{self.weights[0]} down to {self.weights[-1]} elements"
        )
        return f"the {len(self.indices)} heaviest of {scope}, {spread}"


def heaviest(
    dataset: Any,
    indices: Sequence[Any],
    count: int,
    *,
    size_fn: SizeFn | None = None,
    max_scan: int = MAX_SCAN,
    seed: int = 0,
) -> Heaviest:
    """The ``count`` heaviest of ``indices`` in ``dataset`` (see the module's doc)."""
    check_count("count", count)
    weigh = size_fn if size_fn is not None else elements
    pool = list(indices)
    if len(pool) > max_scan:
        pool = random.Random(seed).sample(pool, max_scan)
    weighed = []
    for index in pool:
        weight = weigh(dataset[index])
        if isinstance(weight, bool) or not isinstance(weight, int):
            raise ConfigError(
                f"size_fn must return an int (how heavy a sample is, e.g. its tokens), got "
                f"{type(weight).__name__} {weight!r} for sample {index!r}"
            )
        weighed.append((weight, index))
    top = heapq.nlargest(count, weighed, key=lambda pair: pair[0])
    return Heaviest(
        indices=tuple(i for _, i in top),
        weights=tuple(w for w, _ in top),
        scanned=len(pool),
        total=len(indices) if isinstance(indices, Sized) else len(pool),
    )
