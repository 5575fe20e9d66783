"""The emulated device (CPU fault injection): a real OutOfMemoryError above the budget, its
own memory meter, and nothing kept alive by a failed forward."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from helpers import OOM
from torch import nn

import autoaccum
from autoaccum.emulate import MemoryBudget


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 3))


def test_a_failed_forward_keeps_no_activation_alive() -> None:
    """Saved outputs were returned from the pack hook as themselves, a reference cycle with
    their own grad_fn: every emulated OOM kept its activations until a garbage collection."""
    model = MemoryBudget(net(), budget_bytes=10_000)
    alive: list[weakref.ref[torch.Tensor]] = []
    model.module[1].register_forward_hook(lambda m, i, out: alive.append(weakref.ref(out)))
    gc.disable()
    try:
        for _ in range(5):
            with pytest.raises(OOM, match="emulated out of memory"):
                model(torch.randn(200, 4))
        assert [r for r in alive if r() is not None] == []
    finally:
        gc.enable()


def test_the_probe_reads_the_emulated_device_like_a_gpu() -> None:
    budget = MemoryBudget(net(), budget_bytes=200_000, fixed_bytes=50_000)
    x, y = torch.randn(4, 4), torch.randint(0, 3, (4,))
    result = autoaccum.probe(budget, (x, y), upper=512)
    assert result.limit_bytes == 200_000
    assert all(t.peak_allocated is not None for t in result.trials if t.passed)
    assert result.hit_limit
    assert len(result.trials) < 10  # guided by the peaks: no blind doubling to 512
    per_sample = (4 + 64 + 64) * 4  # saved: the input, Tanh's output, the last Linear's input
    assert result.largest_pass == (200_000 - 50_000) // per_sample
