"""Data, models and the single-process reference shared by the distributed tests and workers.

Everything is float64 and seeded, so a worker process and the test process build
bit-identical datasets and initial weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from helpers import OOMAbove
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

WORLD = 2
LR = 0.5
Batch = tuple[torch.Tensor, ...]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


def samples(n: int, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    return TensorDataset(x, y)


def tokens(n: int, length: int = 6, vocab: int = 11, seed: int = 0) -> TensorDataset:
    """Sequences with 1..length target tokens each; the rest is ignored (-100)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, length), generator=gen)
    y = torch.randint(0, vocab, (n, length), generator=gen)
    valid = torch.randint(1, length + 1, (n,), generator=gen)
    y[torch.arange(length).expand(n, length) >= valid.unsqueeze(1)] = -100
    return TensorDataset(x, y)


def mlp(limit: int = 10**9, seed: int = 0) -> nn.Sequential:
    """Linear → Tanh → OOM injection above ``limit`` samples → Linear (no buffers)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), OOMAbove(limit), nn.Linear(8, 3)).double()


def bn_mlp(limit: int = 10**9, seed: int = 0) -> nn.Sequential:
    """Like :func:`mlp` with a BatchNorm: DDP broadcasts its buffers on every forward."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), OOMAbove(limit), nn.Linear(8, 3)
    ).double()


def token_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(11, 4), nn.Tanh(), nn.Linear(4, 11)).double()


def ce(model: nn.Module, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


def token_ce(model: nn.Module, batch: Batch) -> torch.Tensor:
    logits = model(batch[0])
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch[1].reshape(-1), ignore_index=-100
    )


def windows_of(data: TensorDataset, target: int) -> list[Batch]:
    """Global windows: samples [k·target, (k+1)·target) of the dataset, in order."""
    return [tuple(t[i : i + target] for t in data.tensors) for i in range(0, len(data), target)]


def reference(model: nn.Module, windows: Sequence[Batch], loss: LossFn) -> list[float]:
    """Single-process full-window SGD: one forward and backward over each whole window."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for window in windows:
        value = loss(model, window)
        value.backward()
        opt.step()
        opt.zero_grad()
        losses.append(value.item())
    return losses


def rel_diff(params: Sequence[torch.Tensor], ref: nn.Module) -> float:
    pairs = list(zip(params, ref.parameters(), strict=True))
    num = sum(float((p - q.detach()).norm() ** 2) for p, q in pairs)
    den = sum(float(q.detach().norm() ** 2) for _, q in pairs)
    return math.sqrt(num / den)
