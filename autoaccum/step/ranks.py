"""The ranks of a run, and how they agree without ever waiting on a rank that gave up.

Every word the ranks exchange goes through one small all-reduce (a sum of a few float64
numbers, and two slots per rank) on a gloo group of their own: a window's item and sample
counts, each rank's micro-steps, each micro-step's outcome (ran out of memory, failed
otherwise), a window's loss, whether every rank still has data, whether a callback asked to
stop, a probe trial's outcome. The group is separate from the one that reduces gradients,
so an exchange never pairs up with a gradient collective, and on NCCL runs it costs no GPU
synchronisation (the values live on the host).

Two rules make a hang impossible between two exchanges:

* **A rank that fails tells the others.** :meth:`Ranks.run`, :meth:`Ranks.iterate` and
  :meth:`Ranks.give_up` catch this rank's error and say so in its next exchange; every other
  rank learns it in that same exchange and raises a
  :class:`~autoaccum.errors.DistributedError` naming the rank and what happened there.
* **Every exchange says where its rank is** (:data:`POINTS`). Ranks that make different
  calls — one saving a checkpoint while the other checks for a stop, one evaluating while
  the other trains — meet in the next exchange, see that they are at different points, and
  all raise a :class:`~autoaccum.errors.DistributedError` saying where each was. No
  collective is entered by some ranks and not others without an exchange before it.

In a single process every exchange is the identity, with no communication.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from autoaccum.distributed import DistInfo
from autoaccum.errors import DistributedError

__all__ = ["POINTS", "Agreed", "Ranks"]

T = TypeVar("T")

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
    "sharing an epoch's order",
    "planning (every rank's split)",
)


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


def _describe(exc: BaseException, where: str) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}{': ' + text if text else ''} (at {where})"


class Ranks:
    """This process among the run's ranks: the exchange and its rules (see the module's doc).

    Made by every rank at the same point (the exchange group is created then); ``close()``
    when done. Without a process group, or on one rank, nothing is exchanged.
    """

    def __init__(self, info: DistInfo, timeout: datetime.timedelta | None = None) -> None:
        self.info = info
        self.group: dist.ProcessGroup | None = None
        if info.active and info.world_size > 1:
            self.group = dist.new_group(backend="gloo", timeout=timeout)
        self.reported = False  #: this rank's failure has been told to the others

    @property
    def multi(self) -> bool:
        """True when there are other ranks to agree with."""
        return self.group is not None

    @property
    def size(self) -> int:
        """The ranks taking part in the exchange (1 without other ranks)."""
        return self.info.world_size if self.group is not None else 1

    @property
    def rank(self) -> int:
        return self.info.rank if self.group is not None else 0

    # ------------------------------------------------------------------ exchanging

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
        """This rank's word at ``point`` (one of :data:`POINTS`), summed with every rank's, as
        it is: no rule applied (see :meth:`agree`)."""
        size, mine = self.size, self.rank
        per_rank = [0.0] * (2 * size)
        per_rank[mine] = float(each)
        per_rank[size + mine] = float(POINTS.index(point))
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
            each=tuple(round(v) for v in values[7 : 7 + size]),
            points=tuple(round(v) for v in values[7 + size :]),
        )

    def agree(
        self,
        point: str,
        *,
        failure: BaseException | None = None,
        where: str = "training",
        oom: bool = False,
        **values: Any,
    ) -> Agreed:
        """Exchange this rank's word at ``point``. When any rank failed, every rank raises
        (this one its own ``failure``, the others a :class:`DistributedError` saying what
        happened); when the ranks were at different points, every rank raises a
        :class:`DistributedError` saying where each was."""
        agreed = self.exchange(
            "failing" if failure is not None else point,
            oom=oom,
            error=failure is not None,
            **values,
        )
        if agreed.error:
            mine = _describe(failure, where) if failure is not None else None
            reasons = self.gather(mine)
            self.reported = True
            if failure is not None:
                raise failure
            failed = "; ".join(f"rank {r}: {why}" for r, why in enumerate(reasons) if why)
            raise DistributedError(
                f"another rank stopped the run, so this rank stops too instead of waiting for "
                f"it — {failed}"
            )
        if not agreed.same_point:
            self.reported = True  # every rank raises now: nobody is left waiting to be told
            raise DistributedError(
                f"the ranks are out of step: {agreed.where()}. Every rank must make the same "
                "calls in the same order: call run.save_checkpoint() and run.evaluate() on every "
                "rank, not only on rank 0 (each rank holds its part of the state and of the "
                "data; autoaccum writes files on rank 0 only)"
            )
        return agreed

    def gather(self, mine: object) -> list[Any]:
        """Every rank's ``mine``, in rank order; call it right after an :meth:`agree`, so that
        every rank is known to be here."""
        if self.group is None:
            return [mine]
        gathered: list[object] = [None] * self.info.world_size
        dist.all_gather_object(gathered, mine, group=self.group)
        return gathered

    def share(self, mine: list[Any], point: str = "sharing an epoch's order") -> list[Any]:
        """Rank 0's ``mine`` on every rank (every rank calls it at ``point``; the others'
        values are dropped). A list of ints travels as one tensor, anything else pickled."""
        self.agree(point, each=len(mine), where=point)
        if self.group is None:
            return mine
        if all(type(v) is int for v in mine):
            lengths = self.exchange(point, each=len(mine) if self.info.rank == 0 else 0).each
            values = torch.tensor(mine, dtype=torch.int64) if self.info.rank == 0 else None
            if values is None:
                values = torch.empty(lengths[0], dtype=torch.int64)
            dist.broadcast(values, src=dist.get_global_rank(self.group, 0), group=self.group)
            return [int(v) for v in values.tolist()]
        box: list[Any] = [mine]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        return list(box[0])

    def minimum(self, point: str, mine: int, where: str = "training") -> int:
        """The smallest of every rank's ``mine`` (e.g. the micro-batch ceilings of a probe)."""
        return min(self.agree(point, each=mine, where=where).each)

    def same_settings(self, **settings: object) -> None:
        """Every rank must run with the same ``settings`` (the target, the precision, …): a
        rank whose differ would cut other windows or take other steps, and the ranks would
        part ways mid-run. Otherwise every rank raises a :class:`DistributedError`."""
        self.agree("starting the run (the settings of every rank)")
        if not self.multi:
            return
        every = self.gather(settings)
        differ = [k for k in settings if len({repr(s[k]) for s in every}) > 1]
        if differ:
            listed = "; ".join(
                f"{k}: " + ", ".join(f"rank {r} {s[k]!r}" for r, s in enumerate(every))
                for k in differ
            )
            self.reported = True
            raise DistributedError(
                f"the ranks were started with different settings ({listed}); every rank must "
                "pass the same target and settings (target_batch is the global batch over all "
                "ranks, not each rank's share)"
            )

    # ------------------------------------------------------------------ failing

    def run(self, fn: Callable[[], T], where: str = "training") -> T:
        """``fn()``; if it raises on this rank, the other ranks are told before it propagates."""
        try:
            return fn()
        except Exception as exc:
            self.give_up(exc, where)
            raise

    def give_up(self, exc: BaseException, where: str = "training") -> None:
        """Tell the other ranks (once) that this rank fails with ``exc``; the caller raises."""
        if self.multi and not self.reported:
            try:
                self.agree("failing", failure=exc, where=where)
            except BaseException as told:
                if told is not exc:
                    raise

    def iterate(self, items: Iterator[T], where: str = "reading the data") -> Iterator[T]:
        """``items``, each ``next()`` guarded like :meth:`run`."""
        while True:
            try:
                item = next(items)
            except StopIteration:
                return
            except Exception as exc:
                self.give_up(exc, where)
                raise
            yield item

    def close(self) -> None:
        """Release the exchange group."""
        if self.group is not None and dist.is_initialized():
            dist.destroy_process_group(self.group)
        self.group = None
