"""The hand-written training loop every tool is measured against, a window clock that never
synchronises inside a timed step, and the weight comparison of two runs."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from benchmarks.workloads import CountFn, LossFn, autocast_for, batch_len

__all__ = ["WindowClock", "hand_window", "max_rel_diff", "weights"]


def hand_window(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: LossFn,
    micro_batches: Sequence[Any],
    precision: str,
    device: torch.device,
    count_fn: CountFn | None = None,
) -> None:
    """One optimizer step as a user writes it by hand (nanoGPT style): forward under
    autocast, ``loss / accum_iter``, backward, then step and ``zero_grad(set_to_none=True)``.

    When the micro sizes differ, each loss is weighted by its share of the samples; with
    ``count_fn`` (token-level losses), by its share of the items, as torchtune does. Either
    way the step is the gradient of the window's mean, as ``autoaccum.fit`` computes it.
    """
    counts = [count_fn(b) if count_fn else batch_len(b) for b in micro_batches]
    equal = count_fn is None and len(set(counts)) == 1
    total = sum(counts)
    for micro, n in zip(micro_batches, counts, strict=True):
        with autocast_for(precision, device):
            loss = loss_fn(model, micro)
        (loss / len(micro_batches) if equal else loss * (n / total)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class WindowClock:
    """Marks the end of every optimizer step from a step post-hook, without synchronising:
    a CUDA event recorded on the current stream (CPU: the wall clock, the CPU being
    synchronous). :meth:`seconds` synchronises once, after the run, so a timed step pays
    exactly what it pays in training, including any sync of its own (``fit``'s
    ``float(loss)``), which a synchronising hook would hide."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self.device = device
        self.marks: list[Any] = []
        self.cpu_marks: list[float] = []  #: this thread's CPU time at each mark (CPU only)
        self._handle = optimizer.register_step_post_hook(self._hook)

    def _hook(self, *_: object) -> None:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())
            self.cpu_marks.append(time.thread_time())

    def close(self) -> None:
        self._handle.remove()

    def step_seconds(self, warmup: int) -> list[float]:
        """Durations of the steps after the first ``warmup`` (≥ 1: the first step has no
        start mark); one device sync, here."""
        ends = self.marks[max(1, warmup) - 1 :]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return [a.elapsed_time(b) / 1e3 for a, b in itertools.pairwise(ends)]
        return [b - a for a, b in itertools.pairwise(ends)]

    def step_cpu_seconds(self, warmup: int) -> list[float]:
        """On the CPU, the CPU time this thread spent in each step after ``warmup``: with one
        intra-op thread all of a step's work, and none of the time other processes of a
        shared machine took the core (empty on CUDA)."""
        ends = self.cpu_marks[max(1, warmup) - 1 :]
        return [b - a for a, b in itertools.pairwise(ends)]

    def total_seconds(self, warmup: int) -> float | None:
        """From the end of step ``warmup`` to the end of the last: whole windows, one sync."""
        steps = self.step_seconds(warmup)
        return sum(steps) if steps else None


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the parameters (what two runs are compared on)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.named_parameters()}


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest, over parameters, of ``max|a − b| / max|b|`` (per tensor, ∞-norm)."""
    if a.keys() != b.keys():
        raise ValueError("the two models have different parameters")
    worst = 0.0
    for name, ref in b.items():
        scale = float(ref.abs().max()) or 1.0
        worst = max(worst, float((a[name].double() - ref.double()).abs().max()) / scale)
    return worst
