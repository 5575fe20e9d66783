"""A window: the micro-batches of one optimizer step on this rank, and how to cut one."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from autoaccum.errors import BatchError
from autoaccum.step.batches import batch_size, concat_batches, slice_batch

__all__ = ["Window", "cut_window", "measure", "too_small"]


@dataclass(frozen=True)
class Window:
    """The data of one optimizer step on this rank."""

    epoch: int
    index: int
    """0-based index of the window within its epoch."""
    micro_batches: tuple[Any, ...]
    """Host (CPU) batches, one per micro-step, in order."""
    samples: int
    """Samples trained in this window on this rank (the sum of the micro-batch sizes)."""
    dropped: int = 0
    """Samples of this window left out (counted, with a warning): see ``dropped_because``."""
    dropped_because: str = ""
    """Why: the loader's ``drop_last=True``, or a tail too small for any micro-batch (one
    sample on a BatchNorm model)."""
    anywhere: bool = True
    """Some rank trains a sample of this window (False: every rank's share was dropped)."""
    target: int = 0
    """The window's target (samples over all ranks) as its plan gave it (0: not told)."""
    continued: int = 0
    """Samples of this window whose last loss tokens a later window trains (a sample split by
    ``target_tokens``): counted as seen there, once."""


def measure(batch: Any, index: int) -> int:
    """``batch_size(batch)``, with an error that says which batch of the data was wrong."""
    try:
        return batch_size(batch)
    except BatchError as err:
        raise BatchError(
            f"batch {index} of the data (a {type(batch).__name__}) cannot be used: {err}"
        ) from err


def too_small(plan_min: int) -> str:
    """Why a window's tail was dropped: no micro-batch may hold fewer than ``plan_min``."""
    return (
        f"a micro-batch needs at least {plan_min} samples on this model (BatchNorm cannot "
        "normalise one sample), and no split of the window could hold them"
    )


def cut_window(
    epoch: int, index: int, pieces: Iterable[tuple[Any, int]], sizes: Sequence[int], dropped: int
) -> Window:
    """A window whose micro-batches of ``sizes`` are cut from consecutive ``pieces``.

    A micro-batch inside one piece is a slice of it (no copy); one that spans pieces is
    joined with :func:`~autoaccum.step.batches.concat_batches`. Samples of the pieces
    beyond ``sum(sizes)`` are the ``dropped`` ones.
    """
    queue = deque(pieces)
    micro_batches = []
    for size in sizes:
        parts, need = [], size
        while need:
            piece, n = queue[0]
            if n <= need:
                parts.append(piece)
                queue.popleft()
                need -= n
            else:
                parts.append(slice_batch(piece, 0, need))
                queue[0] = (slice_batch(piece, need, n), n - need)
                need = 0
        micro_batches.append(concat_batches(parts))
    return Window(epoch, index, tuple(micro_batches), sum(sizes), dropped)
