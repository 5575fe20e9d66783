"""Which micro-batch sizes bench_throughput sweeps, and what the sweep says (pure).

The sweep is over *plans*: every size is the largest micro-batch of some
``make_plan(target_batch, m)`` (:func:`autoaccum.probing.choose.plan_sizes`), so each point
is a plan ``fit`` would really make. It reaches above the plan (every plan size up to the
largest size the probe trained, then the first one beyond it, expected to run out of
memory) and below it (the plan sizes nearest ¾, ½, ⅜, ¼ and ⅛ of it), and it holds the
plans the chooser timed. The shares are then measured figures: the plan is one point of
the sweep, and the best is the best of all points that trained.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from autoaccum.probing.choose import plan_sizes

__all__ = ["BELOW", "shares", "sweep_sizes"]

#: the fractions of the plan's micro-batch swept below it
BELOW = (3 / 4, 1 / 2, 3 / 8, 1 / 4, 1 / 8)


def sweep_sizes(
    target: int,
    plan_micro: int,
    largest_pass: int,
    *,
    extra: Iterable[int] = (),
    min_micro: int = 1,
    below: Sequence[float] = BELOW,
) -> list[int]:
    """The micro-batch sizes to measure, ascending (see the module docstring); ``extra``
    are sizes that must be included (the chooser's candidates and choice)."""
    sizes = plan_sizes(target, target, min_micro)  # every plan size, largest first
    picked = {plan_micro, *extra}
    picked.update(s for s in sizes if plan_micro < s <= largest_pass)
    beyond = [s for s in sizes if s > max(plan_micro, largest_pass)]
    if beyond:
        picked.add(min(beyond))
    for fraction in below:
        want = plan_micro * fraction
        picked.add(min(sizes, key=lambda s: (abs(s - want), -s)))
    return sorted(picked)


def shares(rows: Sequence[dict[str, Any]], plan_micro: int, chosen_micro: int) -> dict[str, Any]:
    """The best measured row, and the plan's and the chosen plan's samples/s as shares of
    it (None where that point did not train)."""
    rate = {r["micro_batch"]: r["samples_per_s"] for r in rows if r.get("samples_per_s")}
    if not rate:
        return {"best": None, "plan_share": None, "chosen_share": None}
    best = max(rate, key=lambda s: (rate[s], -s))
    top = rate[best]
    return {
        "best": {"micro_batch": best, "samples_per_s": top},
        "plan_share": rate[plan_micro] / top if plan_micro in rate else None,
        "chosen_share": rate[chosen_micro] / top if chosen_micro in rate else None,
    }
