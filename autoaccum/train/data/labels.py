"""Where a sample's loss tokens are, and how to mask some of them: what lets ``target_tokens``
split a sample between two windows (:mod:`~autoaccum.train.data.tokens`)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Labels", "labels_of"]


@dataclass(frozen=True)
class Labels:
    """Where a sample's loss tokens are: its labels (``key`` of a dict sample, or index 1 of
    an ``(inputs, targets)`` pair when ``key`` is None), the ones not ``ignore``, less the
    first where the model ``shift`` s them."""

    key: Any = None
    shift: bool = False
    ignore: int = -100

    def _find(self, sample: Any) -> tuple[Any, Any] | None:
        if isinstance(sample, Mapping):
            key = "labels" if self.key is None else self.key
            return (key, sample[key]) if key in sample else None
        if isinstance(sample, (tuple, list)) and len(sample) == 2 and self.key is None:
            return 1, sample[1]
        return None

    def positions(self, sample: Any) -> list[int] | None:
        """The label positions that are loss tokens (None: the sample's labels cannot be
        found, or are not one row of labels)."""
        found = self._find(sample)
        if found is None:
            return None
        values = found[1].tolist() if isinstance(found[1], torch.Tensor) else found[1]
        if not isinstance(values, list) or any(isinstance(v, list) for v in values):
            return None
        start = 1 if self.shift else 0
        return [p for p in range(start, len(values)) if values[p] != self.ignore]

    def masked(self, sample: Any, keep: Sequence[int]) -> Any:
        """``sample`` with every loss token but those at ``keep`` masked (a copy)."""
        found = self._find(sample)
        assert found is not None  # only samples whose positions() were found are split
        key, labels = found
        kept = set(keep)
        drop = [p for p in self.positions(sample) or [] if p not in kept]
        if isinstance(labels, torch.Tensor):
            labels = labels.clone()
            labels[drop] = self.ignore
        else:
            labels = list(labels)
            for p in drop:
                labels[p] = self.ignore
        if isinstance(sample, Mapping):
            out: Any = copy.copy(sample)
            out[key] = labels
            return out
        return (
            type(sample)((sample[0], labels)) if isinstance(sample, tuple) else [sample[0], labels]
        )


def labels_of(count_fn: Any) -> Labels | None:
    """How to find the loss tokens ``count_fn`` counts, where they can be split (None:
    windows of whole samples)."""
    from autoaccum.step.counting import DefaultCount
    from autoaccum.step.losses import TokenCount

    if isinstance(count_fn, TokenCount):
        return Labels(count_fn.key, count_fn.shift, count_fn.ignore_index)
    if isinstance(count_fn, DefaultCount):
        return Labels(None, bool(count_fn.shift))
    return None
