"""Choosing the fastest plan in the probe: timing the few candidate sizes the choice needs.

The decision itself is pure (:mod:`~autoaccum.probing.choose`); this module runs the timings
with the probe's own trial pieces, inside the probe's snapshot (so the optimizer step it
times leaves no trace). A candidate that runs out of memory while being timed is dropped.
Timings are one process's: with several ranks the probe keeps the largest plan.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from autoaccum.errors import ConfigError
from autoaccum.probing.choose import Choice, candidate_sizes, choose_fastest, time_call
from autoaccum.step.oom import free_memory, is_oom

__all__ = ["CHOICES", "check_choose", "time_and_choose"]

#: How the probe picks the micro-batch under its ceiling.
CHOICES = ("auto", "fastest", "largest")


def check_choose(choose: object) -> str:
    if choose not in CHOICES:
        raise ConfigError(f"choose must be one of {', '.join(CHOICES)}; got {choose!r}")
    return str(choose)


def _timed(run: Callable[[], object], sync: Callable[[], object]) -> float | None:
    """Seconds per call of ``run``, or None when it ran out of memory."""
    try:
        return time_call(run, warmup=1, repeats=2, sync=sync)
    except Exception as exc:
        if not is_oom(exc):
            raise
    return None


def time_and_choose(
    *,
    per_rank: int,
    ceiling: int,
    min_micro: int,
    micro_step: Callable[[int], object],
    optimizer_step: Callable[[], object],
    cleanup: Callable[[], object],
    sync: Callable[[], object],
    device: torch.device,
) -> Choice | None:
    """Time one micro-step at each candidate size and one optimizer step, then choose; None
    when no candidate could be timed (one process: several ranks plan with the largest).
    ``cleanup`` drops the gradients between sizes."""
    timings: dict[int, float] = {}
    for size in candidate_sizes(per_rank, ceiling, min_micro):
        seconds = _timed(partial(micro_step, size), sync)
        cleanup()
        if seconds is None:  # outside the except block: no frame pins the failed tensors
            free_memory(device)
        if seconds is not None:
            timings[size] = seconds
    if not timings:
        return None
    micro_step(min(timings))  # gradients exist for the step to update, as in training
    step = _timed(optimizer_step, sync) or 0.0
    cleanup()
    return choose_fastest(per_rank, ceiling, timings, step_seconds=step, min_micro=min_micro)
