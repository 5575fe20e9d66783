"""The hand-written training loop every tool is measured against, and a step clock."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from benchmarks.common import sync
from benchmarks.workloads import LossFn, autocast_for, batch_len

__all__ = ["StepClock", "hand_window"]


def hand_window(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    micro_batches: Sequence[Any],
    precision: str,
    device: torch.device,
) -> None:
    """One optimizer step as a user writes it by hand (nanoGPT style): forward under
    autocast, ``loss / accum_iter`` (weighted by size when the micro sizes differ),
    backward, then step and ``zero_grad(set_to_none=True)``."""
    accum_iter = len(micro_batches)
    sizes = [batch_len(b) for b in micro_batches]
    equal = len(set(sizes)) == 1
    total = sum(sizes)
    for micro, n in zip(micro_batches, sizes, strict=True):
        with autocast_for(precision, device):
            loss = loss_fn(model, micro)
        (loss / accum_iter if equal else loss * (n / total)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class StepClock:
    """Times optimizer steps from a step post-hook (device-synchronised), so the hand loop
    and ``autoaccum.fit`` are timed by exactly the same code."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []
        self._handle = optimizer.register_step_post_hook(self._hook)

    def _hook(self, *_: object) -> None:
        sync(self.device)
        self.times.append(time.perf_counter())

    def close(self) -> None:
        self._handle.remove()

    def step_seconds(self, warmup: int) -> list[float]:
        """Durations of the steps after the first ``warmup`` (at least one, the first step
        has no start mark)."""
        ends = self.times[max(1, warmup) - 1 :]
        return [b - a for a, b in itertools.pairwise(ends)]
