"""Probing the worst batch, not the first: with variable-length data the probe runs on the
heaviest samples, so a later, longer batch does not run out of memory."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import OOM
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

import autoaccum
from autoaccum import ConfigError
from autoaccum.train.data.heaviest import elements, heaviest


class Lengths(Dataset[torch.Tensor]):
    """Sequences of ``lengths[i]`` tokens: short ones first, the long ones late in the epoch."""

    def __init__(self, lengths: list[int]) -> None:
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.arange(self.lengths[i]) % 7 + 1


def pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    targets = ids.masked_fill(ids == 0, -100)
    return ids, targets


class TokenBudget(nn.Module):
    """Runs out of memory above ``budget`` padded tokens per micro-batch (as activations do)."""

    def __init__(self, budget: int) -> None:
        super().__init__()
        self.budget = budget
        self.embed = nn.Embedding(8, 8)
        self.head = nn.Linear(8, 8)
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.shapes.append(tuple(ids.shape))
            if ids.numel() > self.budget:
                raise OOM(f"CUDA out of memory. Tried to allocate {ids.numel()} B (injected)")
        return self.head(self.embed(ids))


def token_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    logits = model(batch[0])
    return F.cross_entropy(logits.reshape(-1, 8), batch[1].reshape(-1), ignore_index=-100)


LENGTHS = [4] * 40 + [30] * 8  # the 8 long sequences come last


def test_the_heaviest_samples_are_found_and_said() -> None:
    found = heaviest(Lengths(LENGTHS), range(48), 5)
    assert set(found.indices) <= set(range(40, 48))
    assert found.weights == (30,) * 5
    assert found.describe() == "the 5 heaviest of 48 samples, 30 elements each"
    sampled = heaviest(Lengths(LENGTHS), range(48), 5, max_scan=10)
    assert sampled.scanned == 10
    assert "a seeded random 10 of them weighed" in sampled.describe()
    assert heaviest(Lengths(LENGTHS), range(48), 3, size_fn=lambda s: -len(s)).weights == (-4,) * 3
    with pytest.raises(ConfigError, match="size_fn must return an int"):
        heaviest(Lengths(LENGTHS), range(48), 3, size_fn=lambda s: "long")


def test_a_samples_weight_counts_its_elements_however_they_nest() -> None:
    sample = {"ids": torch.zeros(3, 4), "tags": [[1, 2], [3]], "text": "hello", "label": 1}
    assert elements(sample) == 12 + 3 + 5 + 1


def _fit(model: nn.Module, **kwargs: Any) -> autoaccum.FitResult:
    return autoaccum.fit(
        model,
        DataLoader(Lengths(LENGTHS), batch_size=8, collate_fn=pad),
        16,
        loss_fn=token_loss,
        count_fn=lambda b: int((b[1] != -100).sum()),
        device="cpu",
        progress=False,
        report=False,
        **kwargs,
    )


def test_the_probe_on_the_heaviest_samples_plans_what_the_longest_batch_needs() -> None:
    model = TokenBudget(budget=8 * 30)  # 8 long sequences fit, 16 short ones as well
    result = _fit(model)
    assert result.probe is not None
    assert result.probe.probed_on == "the 16 heaviest of 48 samples, 30 down to 4 elements"
    assert result.oom_retries == 0  # the long last windows fit: the probe saw them
    assert max(b * t for b, t in model.shapes[-6:]) <= 8 * 30


def test_a_probe_on_the_first_window_would_run_out_of_memory_later() -> None:
    """Negative control: the first window's short samples pass at 16, the long ones do not."""
    model = TokenBudget(budget=8 * 30)
    acc = autoaccum.Accumulator(model, target_batch=16, loss_fn=token_loss)
    loader = DataLoader(Lengths(LENGTHS), batch_size=8, collate_fn=pad)
    acc.probe(acc.source(loader).sample_batch(16))
    assert acc.plan is not None
    assert acc.plan.micro_batch == 16

    def train() -> None:
        for window in acc.windows(loader):
            acc.train_window(window)

    with pytest.warns(UserWarning, match="out of memory"):
        train()
    assert acc.resizer.oom_retries >= 1
