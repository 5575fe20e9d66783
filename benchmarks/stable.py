"""The stable maximum, bracketed exactly: the largest micro-batch that trains N steps in a
fresh process, and the smallest that runs out of memory there, one apart.

Pure logic over a ``fresh(size) -> bool`` oracle (bench_probe runs
:mod:`benchmarks.fresh_run` behind it; the tests script it):

1. **down through the candidates** (the tools' choices, their in-process maxima, the first
   size autoaccum saw fail), largest first, until one trains;
2. **up past the top** when none failed: a size that trained is only a lower bound, so
   gallop upward (steps of ``grow`` × the size, at least 1, doubling) until one fails;
3. **down from a failure** when nothing trained yet, galloping the same way;
4. **bisect** between the largest that trained and the smallest that failed, until they
   are one apart.

The search stops early only when the oracle raises :class:`Stop` (time budget, a run that
did not finish cleanly) or after ``max_runs`` runs; the bracket then says what is known.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Bracket", "Stop", "bracket_stable"]


class Stop(Exception):
    """Raised by the fresh-run oracle to end the search; its message says why."""


@dataclass
class Bracket:
    """What the fresh runs showed: ``outcomes[size]`` is True when ``size`` trained."""

    outcomes: dict[int, bool] = field(default_factory=dict)
    tried: list[int] = field(default_factory=list)
    stopped: str | None = None
    upper: int | None = None  #: no size above this is tried

    @property
    def largest_ok(self) -> int | None:
        return max((s for s, ok in self.outcomes.items() if ok), default=None)

    @property
    def smallest_fail(self) -> int | None:
        return min((s for s, ok in self.outcomes.items() if not ok), default=None)

    @property
    def bound(self) -> str:
        """``exact``, ``at_least`` (no failure seen), ``at_most`` (nothing trained),
        ``range`` (stopped before the two met) or ``unknown`` (no run)."""
        ok, fail = self.largest_ok, self.smallest_fail
        if fail is not None and fail == (ok or 0) + 1:
            return "exact"
        if ok is not None and fail is None:
            return "at_least"
        if ok is None and fail is not None:
            return "at_most"
        return "range" if ok is not None else "unknown"

    @property
    def stable_max(self) -> int | None:
        """The stable maximum when exact, else None."""
        return (self.largest_ok or 0) if self.bound == "exact" else None

    def survives(self, size: int) -> tuple[bool | None, str]:
        """Whether ``size`` trains N steps fresh: measured, inferred from a larger size that
        trained or a smaller one that failed (memory grows with the size), or unknown."""
        if size in self.outcomes:
            return self.outcomes[size], "measured"
        ok, fail = self.largest_ok, self.smallest_fail
        if ok is not None and size <= ok:
            return True, "inferred"
        if fail is not None and size >= fail:
            return False, "inferred"
        return None, "unknown"

    def describe(self) -> str:
        ok, fail = self.largest_ok, self.smallest_fail
        bound = self.bound
        if bound == "exact":
            return f"{ok or 0} (exact: {fail} fails)"
        if bound == "at_least":
            top = " (every size tried up to the upper bound trained)" if ok == self.upper else ""
            return f"≥ {ok}{top}"
        if bound == "at_most":
            return f"< {fail}"
        return f"{ok}–{(fail or 0) - 1}" if bound == "range" else "unknown"

    def to_dict(self) -> dict[str, Any]:
        return {
            "tried": list(self.tried),
            "outcomes": {str(s): ok for s, ok in self.outcomes.items()},
            "largest_ok": self.largest_ok,
            "smallest_fail": self.smallest_fail,
            "bound": self.bound,
            "stable_max": self.stable_max,
            "stopped": self.stopped,
            "upper": self.upper,
            "describe": self.describe(),
        }


def bracket_stable(
    candidates: Iterable[int],
    fresh: Callable[[int], bool],
    *,
    upper: int | None = None,
    grow: float = 0.02,
    max_runs: int | None = None,
) -> Bracket:
    """Bracket the stable maximum, starting from ``candidates`` (see the module docstring)."""
    b = Bracket(upper=upper)

    def run(size: int) -> bool:
        if max_runs is not None and len(b.tried) >= max_runs:
            raise Stop(f"--max-fresh-runs {max_runs} reached")
        ok = fresh(size)
        b.tried.append(size)
        b.outcomes[size] = ok
        return ok

    def step(size: int) -> int:
        return max(1, math.ceil(size * grow))

    try:
        for size in sorted({c for c in candidates if upper is None or c <= upper}, reverse=True):
            if run(size):
                break
        ok, fail = b.largest_ok, b.smallest_fail
        if ok is not None and fail is None:  # 2. only a lower bound: go up until one fails
            jump = step(ok)
            while fail is None and (upper is None or ok < upper):
                size = ok + jump if upper is None else min(ok + jump, upper)
                if run(size):
                    ok, jump = size, jump * 2
                else:
                    fail = size
        if ok is None and fail is not None:  # 3. nothing trained: go down until one does
            jump = step(fail)
            while ok is None and fail > 1:
                size = max(1, fail - jump)
                if run(size):
                    ok = size
                else:
                    fail, jump = size, jump * 2
        while ok is not None and fail is not None and fail - ok > 1:  # 4. bisect
            mid = (ok + fail) // 2
            if run(mid):
                ok = mid
            else:
                fail = mid
    except Stop as why:
        b.stopped = str(why)
    return b
