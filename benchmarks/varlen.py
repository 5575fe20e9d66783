"""Variable-length text: where the longest batch, not the typical one, decides the memory.

Sequence lengths are drawn (seeded) from a log-normal distribution, clipped to
``[min_len, context]``, a long tail like real instruction or chat data: with the full-size
settings (median 128 tokens, σ = 0.8, context 1024) half of the samples are shorter than
128 tokens, one in 50 is longer than 640 and about one in 200 fills the context. A
map-style :class:`VarLenTokens` dataset serves them and :func:`pad_collate` pads each
*micro-batch* to its own longest sample (targets of padding are ``-100``), so a micro-batch
costs memory in proportion to ``size × its longest length``: a size that trained for 50
steps can still run out of memory at step 180, when a batch full of long samples comes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

__all__ = [
    "IGNORE",
    "LengthSpec",
    "VarLenTokens",
    "count_targets",
    "draw_lengths",
    "lm_loss",
    "pad_collate",
]

IGNORE = -100  #: the target of a padding position (``F.cross_entropy``'s ignore_index)

TextBatch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class LengthSpec:
    """A log-normal length distribution with median ``median``, clipped to
    ``[min_len, context]`` (lengths of the inputs; a sample holds one more token)."""

    context: int = 1024
    median: float = 128.0
    sigma: float = 0.8
    min_len: int = 8
    vocab: int = 50257


def draw_lengths(spec: LengthSpec, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` input lengths (int64), the same for the same ``seed``."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(count, generator=g, dtype=torch.float64)
    lengths = torch.exp(math.log(spec.median) + spec.sigma * z).round()
    return lengths.clamp(spec.min_len, spec.context).to(torch.int64)


class VarLenTokens(Dataset[torch.Tensor]):
    """Sample ``i``: ``lengths[i] + 1`` random tokens (inputs and the shifted targets),
    generated from ``(seed, i)`` on demand, so every process sees the same samples."""

    def __init__(self, spec: LengthSpec, count: int = 1 << 17, seed: int = 0) -> None:
        self.spec = spec
        self.seed = seed
        self.lengths = draw_lengths(spec, count, seed)

    def __len__(self) -> int:
        return int(self.lengths.numel())

    def __getitem__(self, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        n = int(self.lengths[i]) + 1
        return torch.randint(0, self.spec.vocab, (n,), generator=g)


def pad_collate(samples: Sequence[torch.Tensor]) -> TextBatch:
    """``(inputs, targets)``, both ``(B, L)`` with ``L`` the longest input in *this* batch;
    padded inputs are token 0, padded targets :data:`IGNORE`."""
    longest = max(int(s.numel()) for s in samples) - 1
    inputs = torch.zeros(len(samples), longest, dtype=torch.int64)
    targets = torch.full((len(samples), longest), IGNORE, dtype=torch.int64)
    for row, sample in enumerate(samples):
        n = int(sample.numel()) - 1
        inputs[row, :n] = sample[:-1]
        targets[row, :n] = sample[1:]
    return inputs, targets


def lm_loss(model: nn.Module, batch: TextBatch) -> torch.Tensor:
    """Mean next-token cross-entropy over the non-padding targets. With right padding and
    causal attention, padding never reaches a real token, so no attention mask is needed."""
    inputs, targets = batch
    logits = model(inputs)
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE
    )


def count_targets(batch: TextBatch) -> int:
    """How many targets :func:`lm_loss` averages over (``fit``'s ``count_fn``)."""
    return int((batch[1] != IGNORE).sum())
