"""What a window of each target looks like on this rank: the targets along the run (a number or
a schedule), the micro-batch ceiling (:class:`~autoaccum.train.resize.Resizer` keeps it), and
the plan in force. Pure arithmetic but for :meth:`Planner.with_rank_sizes`, which asks every
rank for its split."""

from __future__ import annotations

import dataclasses

from autoaccum.errors import ConfigError
from autoaccum.plan import Plan, check_target, make_plan, packed_plan, shares
from autoaccum.schedule import Schedule, largest
from autoaccum.step.batches import batch_size
from autoaccum.step.ranks import Ranks
from autoaccum.train.data.cut import Window
from autoaccum.train.resize import Resizer

__all__ = ["Planner"]


@dataclasses.dataclass(eq=False)
class Planner:
    """The plans of one rank: window by window, each under the ceiling of the moment."""

    schedule: Schedule  #: the target of every optimizer step (0-based)
    world_size: int
    rank: int
    min_micro: int
    resizer: Resizer  #: holds the ceiling: the first (probed or given), and now
    plan: Plan | None = None  #: the plan in force: the last window's, or the first
    #: with target_tokens: the longest sample's length (the ceiling, in padded tokens, is
    #: that many samples of it); 0 for windows of samples
    longest: int = 0
    tokens: bool = False  #: the targets count loss tokens

    @property
    def share(self) -> int:
        """This rank's samples of a full window of the largest target (ranks may hold one
        more or less): no micro-batch needs to hold more."""
        return shares(largest(self.schedule), self.world_size)[self.rank]

    def plan_for(self, target: int) -> Plan:
        """The plan for a window of ``target`` samples under the micro-batch ceiling now (with
        target_tokens: of ``target`` loss tokens, under the budget of padded tokens now)."""
        ceiling = self.resizer.current
        assert ceiling is not None  # planned: replan() set it
        if self.longest:
            return packed_plan((max(1, ceiling // self.longest),), target, ceiling, packed=False)
        check_target(target, self.world_size, min_micro=self.min_micro)
        mine = min(ceiling, shares(target, self.world_size)[self.rank])
        plan = make_plan(target, mine, self.world_size, min_micro=self.min_micro, rank=self.rank)
        if self.plan is not None and plan.micro_sizes == self.plan.micro_sizes:
            return dataclasses.replace(plan, rank_sizes=self.plan.rank_sizes)
        return plan

    def replan(self, max_micro: int, step: int, ranks: Ranks) -> Plan:
        """Plan under the ceiling ``max_micro`` (every rank calls it, each with its own ceiling
        if it likes) for optimizer step ``step``'s target."""
        if self.tokens and not self.longest:
            raise ConfigError(
                "with target_tokens the ceiling is a budget of padded tokens, measured on the "
                "data's longest sample: give the data first (acc.source(loader), or let "
                "acc.windows(loader) probe), then replan"
            )
        if self.longest:  # a budget of padded tokens: max_micro samples of the longest
            budget = max_micro * self.longest
            self.resizer.current = self.resizer.ceiling = budget
            self.plan = packed_plan((max_micro,), self.schedule(step), budget, packed=False)
            return self.plan
        ceiling = min(max_micro, self.share)
        self.resizer.current = ceiling
        if self.resizer.ceiling is None:
            self.resizer.ceiling = ceiling
        self.plan = None
        self.plan = self.with_rank_sizes(self.plan_for(self.schedule(step)), ranks)
        return self.plan

    def for_window(self, window: Window) -> Plan:
        """The plan a window is trained under: its target's, or with target_tokens the one of
        its packed micro-batches (whose sizes the window already holds)."""
        if not self.longest:
            return self.plan_for(window.target or self.schedule(0))
        sizes = tuple(batch_size(batch) for batch in window.micro_batches)
        budget = self.resizer.current or 0
        return packed_plan(sizes, window.target, budget, self.min_micro)

    def trained(self, after: Plan) -> None:
        """The plan in force after a window: ``after`` (smaller after an out-of-memory error,
        grown back after a run of clean windows); with target_tokens, its budget."""
        self.plan = after
        if self.longest:  # the budget the resizer made smaller or grew back, or kept
            self.resizer.current = after.budget

    def with_rank_sizes(self, plan: Plan, ranks: Ranks) -> Plan:
        """``plan`` knowing every rank's split (every rank calls it, at the same point)."""
        if self.longest:  # a token window's split is its own; none to share
            return plan
        point = "planning (every rank's split)"
        ranks.agree(point, where=point)
        every = tuple(tuple(sizes) for sizes in ranks.gather(plan.micro_sizes))
        return dataclasses.replace(plan, rank_sizes=every if ranks.multi else ())
