"""Changing the micro-batch during training: how much smaller after an out-of-memory error,
and cutting a window's samples into the new sizes.

A probed size can still run out of memory later: a longer sequence in a padded batch,
fragmentation after hours, another process taking memory. Before the optimizer step
nothing of a window has reached the weights, so the window can simply be run again
with smaller micro-batches: the gradient is count-weighted, hence the step is the same.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

from autoaccum.errors import BatchError, NoBatchFitsError, PlanError
from autoaccum.plan import Plan, even_split, make_plan
from autoaccum.results import Resize
from autoaccum.train.batches import batch_size, concat_batches, split_batch
from autoaccum.train.data.window import Window

__all__ = ["SHRINK", "Resizer", "rechunk", "shrink", "smaller_plan"]

#: Fraction of the micro-batch given up after an out-of-memory error in training.
SHRINK = 0.1


def shrink(micro_batch: int) -> int:
    """The next micro-batch to try after ``micro_batch`` ran out of memory (0: none left)."""
    return micro_batch - max(1, math.ceil(SHRINK * micro_batch))


def smaller_plan(plan: Plan, where: str, retries: int) -> Plan:
    """The plan to re-run a window with after ``plan`` ran out of memory at ``where``; a
    :class:`NoBatchFitsError` when no smaller exact plan exists for this model."""
    old = plan.micro_batch
    smaller = shrink(old)
    if smaller < plan.min_micro:
        raise NoBatchFitsError(
            f"at {where} training ran out of memory even at micro-batch {old}, the smallest "
            f"this model trains on, after {retries} smaller retries. Free memory held by other "
            "tensors or processes, use precision='bf16', activation checkpointing or a smaller "
            "model"
        )
    try:
        return make_plan(plan.target_batch, smaller, plan.world_size, min_micro=plan.min_micro)
    except PlanError as err:
        raise NoBatchFitsError(
            f"at {where} training ran out of memory at micro-batch {old}, and no smaller exact "
            f"plan exists: {err}"
        ) from None


def rechunk(micro_batches: Sequence[Any], plan: Plan) -> list[Any]:
    """The window's samples in micro-batches of ``plan``'s sizes.

    Micro-batches are joined and split per ``plan.window_sizes``; batches that cannot be
    joined (padded to different lengths) are each split into pieces no larger than
    ``plan.micro_batch`` instead.
    """
    sizes = [batch_size(b) for b in micro_batches]
    if max(sizes) <= plan.micro_batch:
        return list(micro_batches)
    try:
        return split_batch(concat_batches(list(micro_batches)), plan.window_sizes(sum(sizes)))
    except BatchError:
        pieces: list[Any] = []
        for batch, n in zip(micro_batches, sizes, strict=True):
            pieces.extend(split_batch(batch, even_split(n, math.ceil(n / plan.micro_batch))))
        return pieces


class Resizer:
    """The micro-batch's changes during training, and the rule that makes them: after an
    out-of-memory error the window is re-run with :func:`smaller_plan`, which is kept.
    Every change is recorded as a :class:`~autoaccum.results.Resize` and warned about."""

    def __init__(self) -> None:
        self.resizes: list[Resize] = []
        self.oom_retries = 0

    def after_oom(self, plan: Plan, window: Window, step: int, where: str) -> Plan:
        """The plan to re-run ``window`` with after ``plan`` ran out of memory in it."""
        smaller = smaller_plan(plan, where, self.oom_retries)
        warnings.warn(
            f"out of memory at {where} with micro-batch {plan.micro_batch}; retrying the "
            f"window (nothing was applied) with micro-batch {smaller.micro_batch} and keeping "
            f"it: {smaller.describe()}",
            UserWarning,
            stacklevel=4,
        )
        self.resizes.append(
            Resize(step, window.epoch, window.index, plan.micro_batch, smaller.micro_batch, "oom")
        )
        self.oom_retries += 1
        return smaller
