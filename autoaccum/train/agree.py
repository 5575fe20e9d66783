"""How the ranks of a run agree, step by step, without ever waiting on a rank that gave up.

Every word the ranks exchange during training goes through one small all-reduce (a sum of
a few float64 numbers, and two slots per rank) on a gloo group of its own: the window's item
and sample counts, each rank's micro-steps, each micro-step's outcome (ran out of memory,
failed otherwise), the window's loss, whether every rank still has data, and whether a
callback asked to stop. The group is separate from the one that reduces gradients, so an
exchange never pairs up with a gradient collective, and on NCCL runs it costs no GPU
synchronisation (the values live on the host). A rank that fails anywhere in the loop says so
in its next exchange, and every rank raises instead of waiting.

Every exchange also says *where* its rank is (:data:`POINTS`). Ranks that make different calls
— one saving a checkpoint while the other checks for a stop, one evaluating while the other
trains — meet in the next exchange, see that they are at different points, and all raise a
:class:`~autoaccum.errors.DistributedError` saying where each rank was; no collective is ever
entered by some ranks and not others without an exchange before it.

In a single process every exchange is the identity, with no communication.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from autoaccum.distributed import DistInfo

__all__ = ["POINTS", "Agreed", "Agreement"]

#: Where a rank can be when it exchanges, in words (the index is what travels).
POINTS: tuple[str, ...] = (
    "failing",  # a rank that failed tells the others, wherever they are
    "starting the run (the settings of every rank)",
    "starting an epoch",
    "checking that every rank has a window (rank-local data)",
    "counting a window's items",
    "a micro-step",
    "the window's loss",
    "the optimizer update",
    "the stop check after a step's callbacks",
    "probing the micro-batch",
    "saving a checkpoint",
    "evaluating",
)


def point_code(point: str) -> int:
    """The index of ``point`` in :data:`POINTS` (a programming error when unknown)."""
    return POINTS.index(point)


@dataclass(frozen=True)
class Agreed:
    """What the ranks said, summed over ranks (``each`` and ``points``: rank by rank)."""

    oom: int  #: ranks that ran out of memory
    error: int  #: ranks that failed otherwise
    missing: int  #: ranks without a window (their rank-local data ran out)
    stop: int  #: ranks that ask the run to stop (a callback did)
    items: float
    samples: int
    loss: float
    each: tuple[int, ...]  #: each rank's own number (its micro-steps, its samples), rank order
    points: tuple[int, ...]  #: where each rank was (an index of :data:`POINTS`), rank order

    @property
    def each_equal(self) -> bool:
        """True when every rank said the same ``each``."""
        return len(set(self.each)) <= 1

    @property
    def same_point(self) -> bool:
        """True when every rank was at the same point of the run."""
        return len(set(self.points)) <= 1

    def where(self) -> str:
        """Where each rank was, in words."""
        return "; ".join(f"rank {r} was {POINTS[p]}" for r, p in enumerate(self.points))


class Agreement:
    """The exchange of one run's ranks (see the module's doc). ``close()`` when done."""

    def __init__(self, info: DistInfo, timeout: datetime.timedelta | None = None) -> None:
        self.info = info
        self.group: dist.ProcessGroup | None = None
        if info.active and info.world_size > 1:
            self.group = dist.new_group(backend="gloo", timeout=timeout)

    @property
    def ranks(self) -> int:
        return self.info.world_size if self.group is not None else 1

    def exchange(
        self,
        point: str,
        *,
        oom: bool = False,
        error: bool = False,
        missing: bool = False,
        stop: bool = False,
        each: int = 0,
        items: float = 0.0,
        samples: int = 0,
        loss: float = 0.0,
    ) -> Agreed:
        """This rank's word at ``point`` (one of :data:`POINTS`), summed with every rank's."""
        ranks = self.ranks
        mine = self.info.rank if self.group is not None else 0
        per_rank = [0.0] * (2 * ranks)
        per_rank[mine] = float(each)
        per_rank[ranks + mine] = float(point_code(point))
        values = [float(oom), float(error), float(missing), float(stop), items]
        values += [float(samples), loss, *per_rank]
        if self.group is not None:
            tensor = torch.tensor(values, dtype=torch.float64)
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
            values = tensor.tolist()
        return Agreed(
            oom=round(values[0]),
            error=round(values[1]),
            missing=round(values[2]),
            stop=round(values[3]),
            items=values[4],
            samples=round(values[5]),
            loss=values[6],
            each=tuple(round(v) for v in values[7 : 7 + ranks]),
            points=tuple(round(v) for v in values[7 + ranks :]),
        )

    def gather(self, mine: object) -> list[object]:
        """Every rank's ``mine``, in rank order (after an exchange that agreed on the point)."""
        if self.group is None:
            return [mine]
        gathered: list[object] = [None] * self.info.world_size
        dist.all_gather_object(gathered, mine, group=self.group)
        return gathered

    def close(self) -> None:
        if self.group is not None and dist.is_initialized():
            dist.destroy_process_group(self.group)
        self.group = None
