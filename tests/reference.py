"""Float64 data, models and the full-window reference shared by the exactness tests.

Everything is seeded, so a distributed worker process and the test process build
bit-identical datasets and initial weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

import autoaccum

TOL = 1e-10
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


def token_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(11, 4), nn.Tanh(), nn.Linear(4, 11)).to(torch.float64)


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
    """Full-window SGD: one forward and backward over each whole window."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for window in windows:
        value = loss(model, window)
        value.backward()
        opt.step()
        opt.zero_grad()
        losses.append(value.item())
    return losses


@torch.no_grad()
def rel_diff(params: nn.Module | Iterable[torch.Tensor], ref: nn.Module) -> float:
    """‖params − ref‖ / ‖ref‖ over all parameters."""
    mine = params.parameters() if isinstance(params, nn.Module) else params
    pairs = list(zip(mine, ref.parameters(), strict=True))
    num = sum(float((p - q).norm() ** 2) for p, q in pairs)
    den = sum(float(q.norm() ** 2) for _, q in pairs)
    return math.sqrt(num / den)


def fit_sgd(model: nn.Module, data: Any, target: int, **kwargs: Any) -> autoaccum.FitResult:
    """``autoaccum.fit`` with plain SGD on the CPU, quietly."""
    return autoaccum.fit(
        model,
        data,
        target,
        optimizer=torch.optim.SGD(model.parameters(), lr=LR),
        device="cpu",
        progress=False,
        report=False,
        **kwargs,
    )
