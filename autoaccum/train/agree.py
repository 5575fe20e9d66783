"""How the ranks of a run agree, window by window, without ever waiting on a rank that gave up.

Every word the ranks exchange during training goes through one small all-reduce (a sum of
a few float64 numbers, and one slot per rank for its micro-steps) on a gloo group of its
own: the window's item and sample counts, each rank's micro-steps, each micro-step's
outcome (ran out of memory, failed otherwise), the window's loss, whether every rank still
has data, and whether a callback asked to stop. The group is separate from the one that reduces
gradients, so an exchange never pairs up with a gradient collective, and on NCCL runs it
costs no GPU synchronisation (the values live on the host). A rank that fails anywhere in
the loop says so in its next exchange, and every rank raises instead of waiting.

In a single process every exchange is the identity, with no communication.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from autoaccum.distributed import DistInfo

__all__ = ["Agreed", "Agreement"]


@dataclass(frozen=True)
class Agreed:
    """What the ranks said, summed over ranks."""

    oom: int  #: ranks that ran out of memory
    error: int  #: ranks that failed otherwise
    missing: int  #: ranks without a window (their rank-local data ran out)
    stop: int  #: ranks that ask the run to stop (a callback did)
    items: float
    samples: int
    loss: float
    steps: tuple[int, ...]  #: each rank's micro-steps, in rank order

    @property
    def steps_equal(self) -> bool:
        """True when every rank has the same number of micro-steps."""
        return len(set(self.steps)) <= 1


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
        *,
        oom: bool = False,
        error: bool = False,
        missing: bool = False,
        stop: bool = False,
        steps: int = 0,
        items: float = 0.0,
        samples: int = 0,
        loss: float = 0.0,
    ) -> Agreed:
        """This rank's word, summed with every other rank's."""
        per_rank = [0.0] * self.ranks
        per_rank[self.info.rank if self.group is not None else 0] = float(steps)
        values = [
            float(oom),
            float(error),
            float(missing),
            float(stop),
            items,
            float(samples),
            loss,
        ]
        values += per_rank
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
            steps=tuple(round(v) for v in values[7:]),
        )

    def gather(self, mine: object) -> list[object]:
        """Every rank's ``mine``, in rank order (a checkpoint's per-rank random states)."""
        if self.group is None:
            return [mine]
        gathered: list[object] = [None] * self.info.world_size
        dist.all_gather_object(gathered, mine, group=self.group)
        return gathered

    def reasons(self, mine: str | None) -> list[str | None]:
        """Every rank's failure, in rank order (None: that rank did not fail); called by all
        ranks once an exchange said some rank failed."""
        if self.group is None:
            return [mine]
        gathered: list[str | None] = [None] * self.info.world_size
        dist.all_gather_object(gathered, mine, group=self.group)
        return gathered

    def close(self) -> None:
        if self.group is not None and dist.is_initialized():
            dist.destroy_process_group(self.group)
        self.group = None
