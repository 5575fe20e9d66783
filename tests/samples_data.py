"""Small datasets and readers of windows shared by the data tests."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, TensorDataset

from autoaccum.train.data import Window


def ids_of(window: Window) -> list[int]:
    """The sample ids of a window whose micro-batches are ``(ids,)`` tuples or tensors."""
    out: list[int] = []
    for micro in window.micro_batches:
        tensor = micro[0] if isinstance(micro, (tuple, list)) else micro
        out.extend(tensor.tolist())
    return out


def micro_sizes(window: Window) -> tuple[int, ...]:
    return tuple(len(m[0] if isinstance(m, (tuple, list)) else m) for m in window.micro_batches)


def ids_dataset(n: int) -> TensorDataset:
    return TensorDataset(torch.arange(n))


class Sequences(Dataset[tuple[int, torch.Tensor]]):
    """Sample i is a sequence of ``lengths[i]`` copies of i (variable length)."""

    def __init__(self, lengths: list[int]) -> None:
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        return i, torch.full((self.lengths[i],), i)


def pad_collate(samples: list[tuple[int, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Pad to the longest sequence of *this* batch, as padding collate_fns do."""
    longest = max(len(seq) for _, seq in samples)
    tokens = torch.zeros(len(samples), longest, dtype=torch.long)
    for row, (_, seq) in enumerate(samples):
        tokens[row, : len(seq)] = seq
    return {
        "ids": torch.tensor([i for i, _ in samples]),
        "tokens": tokens,
        "lengths": torch.tensor([len(seq) for _, seq in samples]),
    }
