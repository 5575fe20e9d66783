"""Recovering from an out-of-memory error in the middle of training.

A probed size can still run out of memory later: a longer sequence in a padded
batch, fragmentation after hours, another process taking memory. Before the optimizer
step nothing of a window has reached the weights, so the window can simply be run
again with smaller micro-batches: the gradient is count-weighted, hence the step is
the same. Each retry gives up 10% of the micro-batch (at least one sample) and warns;
the smaller plan is kept for the rest of the run. Only single-process runs recover:
across ranks, one rank's OOM inside a gradient reduction cannot be agreed on without a
collective per micro-step, so there it propagates.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

from autoaccum.errors import BatchError, NoBatchFitsError
from autoaccum.loop import Stepper, WindowOutcome
from autoaccum.oom import free_memory, is_oom
from autoaccum.plan import Plan, even_split, make_plan
from autoaccum.tree import batch_size, concat_batches, split_batch

__all__ = ["SHRINK", "rechunk", "shrink", "step_with_recovery"]

#: Fraction of the micro-batch given up after an out-of-memory error in training.
SHRINK = 0.1


def shrink(micro_batch: int) -> int:
    """The next micro-batch to try after ``micro_batch`` ran out of memory (0: none left)."""
    return micro_batch - max(1, math.ceil(SHRINK * micro_batch))


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


def _attempt(stepper: Stepper, micro_batches: Sequence[Any], where: str) -> WindowOutcome | None:
    """The window's outcome, or None after an out-of-memory error that left the weights as
    they were. Any other error, or one during the optimizer step, propagates."""
    try:
        return stepper.step(micro_batches, where)
    except Exception as exc:
        if stepper.applying or not is_oom(exc) or stepper.dist.world_size > 1:
            raise
    return None


def step_with_recovery(
    stepper: Stepper, micro_batches: Sequence[Any], plan: Plan, where: str
) -> tuple[WindowOutcome, Plan, int]:
    """Train one window, shrinking the plan after out-of-memory errors.

    Returns the outcome, the plan in force afterwards and how many retries it took.
    """
    batches = rechunk(micro_batches, plan)
    retries = 0
    while True:
        outcome = _attempt(stepper, batches, where)
        if outcome is not None:
            return outcome, plan, retries
        # Outside the except block: the traceback no longer pins the failed tensors.
        free_memory(stepper.device)
        smaller = shrink(plan.micro_batch)
        if smaller < 1:
            raise NoBatchFitsError(
                f"at {where} training ran out of memory even at micro-batch 1, after "
                f"{retries} smaller retries. Free memory held by other tensors or processes, "
                "use precision='bf16', activation checkpointing or a smaller model"
            )
        warnings.warn(
            f"out of memory at {where} with micro-batch {plan.micro_batch}; retrying the "
            f"window (nothing was applied) with micro-batch {smaller} and keeping it: "
            f"{make_plan(plan.target_batch, smaller, plan.world_size).describe()}",
            UserWarning,
            stacklevel=4,
        )
        plan = make_plan(plan.target_batch, smaller, plan.world_size)
        batches = rechunk(batches, plan)
        retries += 1
